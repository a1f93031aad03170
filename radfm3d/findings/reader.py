# Copyright (c) radfm3d contributors. Apache-2.0.
"""The findings reader: the encoder's own structured reading of a scan, handed to the LLM as text after its visual
tokens.

A diagnosis-driven prompt in the spirit of PromptMRG (Jin et al., AAAI 2024), where a classifier's output is turned
into prompt tokens for the report decoder. Here the classifier is the stage-0 findings head
(:class:`~radfm3d.findings.heads.StructuredFindingsHead`) over the resampler latents: for every image the reader takes
modality and region (when the label schema has them), per finding site of the region the best finding type with the
score ``sigmoid(finding_present) x softmax(finding_type)`` and, for a schema with per-scan flags,
``sigmoid(flag)``; everything above ``threshold`` is written, best first, e.g.
``" Image reading: <modality>, <region>; <structure> <finding type>, ...."``, as token ids into ``num_tokens``
slots after the image's visual tokens (padded with the filler phrase). The words come from the schema's phrases
(:mod:`radfm3d.findings.schema`), tokenised with the model's tokenizer when the model is built or loaded.

The scores may be averaged over copies of the scan moved by ``test_time_shifts`` voxels (each one more encoder pass):
a 2-10 mm finding cut by a 16x16x4 patch border shows in two patches at partial strength, and a shift of a few voxels
moves the border (measured on val sites: bundle docs).

Reader settings (``RadFM3DFindingsConfig.reader``): ``num_tokens``, ``threshold``, ``head_hidden``,
``test_time_shifts`` (``[[dh, dw, dd], ...]``), ``snap_boxes`` (:mod:`radfm3d.findings.box_snapping`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from radfm3d.findings.heads import StructuredFindingsHead
from radfm3d.findings.schema import LabelSchema

__all__ = ["FindingsReader", "READER_KEYS", "parse_shifts", "reader_settings", "shifted_volume"]

#: the reader settings a findings config holds
READER_KEYS = ("num_tokens", "threshold", "head_hidden", "test_time_shifts", "snap_boxes")


def parse_shifts(shifts: Any) -> list[list[int]]:
    """Test-time shifts in voxels: ``[[dh, dw, dd], ...]``, or the text ``"2,2,0;-2,-2,0"`` (``""`` / ``None`` /
    ``"none"``: no shifts) -> a list of integer triples; raises ``ValueError`` on anything else."""
    if shifts is None or (isinstance(shifts, str) and shifts.strip().lower() in ("", "none")):
        return []
    if isinstance(shifts, str):
        shifts = [part.split(",") for part in shifts.split(";") if part.strip()]
    out = []
    for shift in shifts:
        try:
            triple = [int(str(v).strip()) for v in shift]
        except (TypeError, ValueError):
            triple = []
        if len(triple) != 3:
            raise ValueError(f"a test-time shift is three whole voxel counts 'dh,dw,dd', got {shift!r}")
        out.append(triple)
    return out


def reader_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Checked reader settings with defaults (``num_tokens`` 24, ``threshold`` 0.5, ``head_hidden`` 512, no shifts,
    no snapping); raises ``ValueError`` naming an unknown or mistyped key."""
    unknown = sorted(set(settings) - set(READER_KEYS))
    if unknown:
        raise ValueError(f"findings reader: unknown settings {unknown} (known: {list(READER_KEYS)})")
    out = {"num_tokens": 24, "threshold": 0.5, "head_hidden": 512, "test_time_shifts": [], "snap_boxes": False}
    out.update(settings)
    try:
        out["num_tokens"], out["head_hidden"] = int(out["num_tokens"]), int(out["head_hidden"])
        out["threshold"] = float(out["threshold"])
    except (TypeError, ValueError):
        raise ValueError(f"findings reader: num_tokens / head_hidden must be whole numbers and threshold a number, "
                         f"got {out['num_tokens']!r} / {out['head_hidden']!r} / {out['threshold']!r}") from None
    if out["num_tokens"] < 1 or out["head_hidden"] < 1:
        raise ValueError("findings reader: num_tokens and head_hidden must be >= 1")
    out["test_time_shifts"] = parse_shifts(out["test_time_shifts"])
    if not isinstance(out["snap_boxes"], bool):
        raise ValueError(f"findings reader: snap_boxes must be true or false, got {out['snap_boxes']!r}")
    return out


def shifted_volume(pixel_values: torch.Tensor, shift: Sequence[int]) -> torch.Tensor:
    """``(M, C, H, W, D)`` moved by ``shift = (dh, dw, dd)`` voxels along its last three axes, the uncovered border
    filled with 0 (the preprocessed background; no wrap-around, unlike ``torch.roll``)."""
    out = torch.zeros_like(pixel_values)
    sizes = pixel_values.shape[-3:]
    src = tuple(slice(max(0, -v), n - max(0, v)) for v, n in zip(shift, sizes))
    dst = tuple(slice(max(0, v), n - max(0, -v)) for v, n in zip(shift, sizes))
    out[(..., *dst)] = pixel_values[(..., *src)]
    return out


class FindingsReader(nn.Module):
    """The findings head over one image's resampler latents -> its reading, the reading's text and token ids.

    Holds ``head`` (same parameter names as the stage-0 wrapper's, so its trained head loads unchanged). Frozen and
    always in eval mode (never trained through the LLM loss). :meth:`tokenize` must run once before
    :meth:`token_ids` (the findings model does it with its tokenizer).
    """

    def __init__(self, schema: LabelSchema, settings: Mapping[str, Any], dim: int, num_latents: int) -> None:
        super().__init__()
        self.schema = schema
        self.settings = reader_settings(settings)
        self.head = StructuredFindingsHead(dim, num_latents, schema, self.settings["head_hidden"])
        self.phrase_ids: dict[str, list[int]] | None = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FindingsReader:
        """Always in eval mode: the reader is frozen."""
        return super().train(False)

    @property
    def num_tokens(self) -> int:
        return int(self.settings["num_tokens"])

    @property
    def test_time_shifts(self) -> list[list[int]]:
        return self.settings["test_time_shifts"]

    @property
    def snaps_boxes(self) -> bool:
        """Whether grounding boxes are moved onto the head's finding boxes (needs finding boxes in the schema)."""
        return bool(self.settings["snap_boxes"]) and self.schema.has("finding_box")

    # ------------------------------------------------------------------ reading
    @torch.no_grad()
    def read(self, latents: torch.Tensor, shifted_latents: Sequence[torch.Tensor] = (),
             threshold: float | None = None, outputs: Mapping[str, torch.Tensor] | None = None
             ) -> list[dict[str, Any]]:
        """``latents (M, N, dim)`` (and those of the scans moved by ``test_time_shifts``, in that order) -> per image
        ``{"modality": int | None, "region": int | None, "findings": [(structure, type, score), ...],
        "flags": [(flag, score), ...]}`` (score-sorted, above the threshold; indices into the schema's lists).
        ``threshold`` overrides the settings' (e.g. ``-1``: every site with its best type, to score thresholds);
        ``outputs``: the head's outputs on ``latents`` when already computed."""
        schema = self.schema
        out = self.head(latents.float()) if outputs is None else outputs
        every = [out, *(self.head(s.float()) for s in shifted_latents)]
        threshold = float(self.settings["threshold"] if threshold is None else threshold)
        m_count = latents.shape[0]
        modality = out["modality"].argmax(-1).tolist() if "modality" in out else [None] * m_count
        region = out["region"].argmax(-1).tolist() if "region" in out else [None] * m_count
        site_scores = None
        if schema.has_findings:
            site_scores = torch.stack([torch.sigmoid(o["finding_present"])[..., None] * o["finding_type"].softmax(-1)
                                       for o in every]).mean(0).tolist()
        flag_scores = torch.stack([torch.sigmoid(o["flags"]) for o in every]).mean(0).tolist() \
            if "flags" in out else None
        readings = []
        for m in range(m_count):
            candidates = []
            if site_scores is not None:
                for structure, types in schema.sites(region[m]):
                    scores = site_scores[m][structure]
                    best = max(types, key=lambda t: scores[t])
                    score = float(scores[best])
                    if score > threshold:
                        candidates.append((int(structure), int(best), round(score, 4)))
                candidates.sort(key=lambda c: -c[2])
            flags = []
            if flag_scores is not None:
                flags = sorted(((f, round(float(s), 4)) for f, s in enumerate(flag_scores[m]) if s > threshold),
                               key=lambda c: -c[1])
            readings.append({"modality": modality[m], "region": region[m], "findings": candidates, "flags": flags})
        return readings

    @torch.no_grad()
    def site_boxes(self, latents: torch.Tensor, spatial_size: Sequence[int],
                   shifted_latents: Sequence[torch.Tensor] = (), outputs: Mapping[str, torch.Tensor] | None = None
                   ) -> list[dict[str, list[tuple[int, ...]]]]:
        """The head's boxes for the finding sites of the region it reads, per image, as 0..99 box values on a grid of
        ``spatial_size`` voxels: ``{"finding": [box per site], "structure": [box per site]}``. The finding boxes of
        the shifted scans, moved back by their shift, are averaged with the scan's own (structure boxes: the scan's
        own). Candidates for :func:`radfm3d.findings.box_snapping.snap_box`."""
        from radfm3d.text.boxes import grid_box_to_normalised

        out = self.head(latents.float()) if outputs is None else outputs
        sizes = torch.tensor([float(n) for n in spatial_size] * 2, device=latents.device)
        finding = [out["finding_box"]]
        for shift, shifted in zip(self.test_time_shifts, shifted_latents):
            undo = torch.tensor([float(v) for v in shift] * 2, device=latents.device) / sizes
            finding.append(self.head(shifted.float())["finding_box"] - undo)
        finding_box = torch.stack(finding).mean(0) * sizes  # (M, S, 6) grid voxels
        structure_box = out["structure_box"] * sizes if "structure_box" in out else None
        regions = out["region"].argmax(-1).tolist() if "region" in out else [None] * latents.shape[0]
        boxes = []
        for m, region in enumerate(regions):
            sites = [structure for structure, _ in self.schema.sites(region)]
            entry = {"finding": [grid_box_to_normalised(finding_box[m, s].tolist(), spatial_size) for s in sites],
                     "structure": [] if structure_box is None else
                     [grid_box_to_normalised(structure_box[m, s].tolist(), spatial_size) for s in sites]}
            boxes.append(entry)
        return boxes

    # ------------------------------------------------------------------ text
    def phrase_keys(self, reading: Mapping[str, Any]) -> list[str]:
        """Phrase keys of one reading: prefix, modality, region, then ``structure type`` pairs and flags (or
        "none"), period."""
        schema = self.schema
        keys = ["prefix"]
        head = []
        if reading.get("modality") is not None:
            head.append(f"modality:{schema.modalities[reading['modality']]}")
        if reading.get("region") is not None:
            head.append(f"region:{schema.regions[reading['region']]}")
        for k, key in enumerate(head):
            keys += (["comma"] if k else []) + [key]
        listed = schema.has_findings or schema.has("flags")
        if listed:
            if head:
                keys.append("semicolon")
            items = [[f"structure:{schema.structures[s]}", f"type:{schema.finding_types[t]}"]
                     for s, t, *_ in reading.get("findings", [])]
            items += [[f"flag:{schema.flags[f]}"] for f, *_ in reading.get("flags", [])]
            if not items:
                keys.append("none")
            for k, item in enumerate(items):
                keys += (["comma"] if k else []) + item
        return keys + ["period"]

    def tokenize(self, tokenizer: Any) -> None:
        """Tokenise every phrase of the schema with ``tokenizer`` (no special tokens); raises ``ValueError`` when the
        filler is not one token or a reading without findings does not fit ``num_tokens``."""
        ids = {key: [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
               for key, text in self.schema.phrases.items()}
        if len(ids["filler"]) != 1:
            raise ValueError(f"the tokenizer splits the filler {self.schema.phrases['filler']!r} into {ids['filler']}")
        schema = self.schema
        empties = [{"modality": m, "region": r, "findings": [], "flags": []}
                   for m in (range(len(schema.modalities)) if schema.has("modality") else [None])
                   for r in (range(len(schema.regions)) if schema.has("region") else [None])]
        longest = max(sum(len(ids[k]) for k in self.phrase_keys(e)) for e in empties)
        if longest > self.num_tokens:
            raise ValueError(f"num_tokens={self.num_tokens} cannot hold a reading without findings ({longest} tokens)")
        self.phrase_ids = ids

    def token_ids(self, readings: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> torch.Tensor:
        """Readings -> ``(M, num_tokens)`` long ids (filler-padded; findings and flags that do not fit are dropped,
        lowest score first)."""
        if self.phrase_ids is None:
            raise RuntimeError("FindingsReader.tokenize(tokenizer) must run before token_ids()")
        ids = self.phrase_ids
        rows = []
        for r in readings:
            reading = {**r, "findings": list(r.get("findings", [])), "flags": list(r.get("flags", []))}
            while True:
                row = [i for key in self.phrase_keys(reading) for i in ids[key]]
                if len(row) <= self.num_tokens or not (reading["findings"] or reading["flags"]):
                    break
                if reading["flags"]:
                    reading["flags"] = reading["flags"][:-1]
                else:
                    reading["findings"] = reading["findings"][:-1]
            rows.append(row[: self.num_tokens] + ids["filler"] * (self.num_tokens - len(row)))
        return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), self.num_tokens)

    def text(self, reading: Mapping[str, Any]) -> str:
        """The reading as the text the LLM receives (without the filler)."""
        return "".join(self.schema.phrases[k] for k in self.phrase_keys(reading)).strip()

    def describe(self, reading: Mapping[str, Any]) -> dict[str, Any]:
        """A reading with names instead of indices (for JSON outputs)."""
        schema = self.schema
        out: dict[str, Any] = {"text": self.text(reading)}
        if reading.get("modality") is not None:
            out["modality"] = schema.modalities[reading["modality"]]
        if reading.get("region") is not None:
            out["region"] = schema.regions[reading["region"]]
        if schema.has_findings:
            out["findings"] = [{"structure": schema.structures[s], "type": schema.finding_types[t], "score": p}
                               for s, t, p in reading["findings"]]
        if schema.has("flags"):
            out["flags"] = [{"flag": schema.flags[f], "score": p} for f, p in reading["flags"]]
        return out
