# Copyright (c) radfm3d contributors. Apache-2.0.
"""Findings prompt: the encoder's own structured reading of a scan, handed to the LLM as text after its visual tokens.

A diagnosis-driven prompt in the spirit of PromptMRG (Jin et al., AAAI 2024), where a disease classifier's output is
turned into prompt tokens for the report decoder. Here the classifier is the vision pre-training stage's heads
(:mod:`radfm3d.modeling.heads`), kept inside the model: for every image the model reads modality, region and, per
finding site of that region, the best-scoring finding type from the per-patch finding map inside the predicted
structure box, and writes e.g. ``" Image reading: CT, abdomen; liver mass, right kidney cyst."`` as token ids into
``num_tokens`` extra slots after the image's visual tokens (padded with a filler id). The LLM therefore copies a
detector's reading instead of having to learn to decode it from 32 visual tokens alone, which our CPU-sized LLM
stage could not do (see the bundle docs). Everything the text says comes from the image; a blank image gets its own
reading.

The finding map can come from a :class:`~radfm3d.modeling.detector.FindingDetector` instead of the patch head (spec
key ``"detector"``): a small 3D CNN on the preprocessed volume with cells of 8x8x4 voxels instead of the ViT's
16x16x4-voxel patches, trained by the stage-0 bundle with everything else frozen and swapped into a trained model with
``radfm3d findings-prompt MODEL --heads STAGE0 --replace`` (the visual tokens stay the same).

The specification (``RadFM3DConfig.findings_prompt``) is plain data saved in ``config.json``: class names, finding
sites, the phrases pre-tokenised with the model's tokenizer, the threshold. Build it with
:func:`build_findings_prompt_config`; attach it to a vision-pre-trained model with
``RadFM3DForCausalLM.add_findings_prompt`` (or ``radfm3d findings-prompt``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from radfm3d.modeling.box_snapping import build_box_tokens
from radfm3d.modeling.heads import build_finding_heads

if TYPE_CHECKING:
    from radfm3d.data.structured_labels import LabelSchema

__all__ = ["FindingsPrompter", "build_findings_prompt_config", "PHRASE_PREFIX", "SITE_SCORES", "parse_shifts",
           "check_reading_options", "shifted_volume"]

PHRASE_PREFIX = " Image reading:"
#: a finding's patch must have its centre inside the predicted structure box grown by this margin (unit grid)
BOX_MARGIN = 0.03
#: where a site's finding score comes from: "patch_map" (the best finding-map cell inside the predicted structure
#: box; the map from the patch head or a detector) or "head" (the latent head's per-structure presence x type)
SITE_SCORES = ("patch_map", "head")


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


def check_reading_options(spec: Mapping[str, Any]) -> list[list[int]]:
    """Check how a findings-prompt ``spec`` reads sites — ``site_scores`` one of :data:`SITE_SCORES` (default
    ``"patch_map"``), no ``detector`` with ``"head"`` (it reads no map), ``test_time_shifts`` only with ``"head"``
    (they average the head's site scores), ``snap_boxes`` only with the tokenizer's ``box_tokens`` — and return the
    parsed shifts. Raises ``ValueError``. The one place these
    rules live: the config builder, the prompter and ``radfm3d findings-prompt`` all call it."""
    site_scores = spec.get("site_scores", "patch_map")
    if site_scores not in SITE_SCORES:
        raise ValueError(f"findings prompt: site_scores {site_scores!r}; expected one of {SITE_SCORES}")
    if site_scores == "head" and spec.get("detector"):
        raise ValueError("findings prompt: site_scores 'head' does not read a finding map, so a detector is unused")
    shifts = parse_shifts(spec.get("test_time_shifts"))
    if shifts and site_scores != "head":
        raise ValueError("test_time_shifts average the latent head's site scores, so they need site_scores 'head' "
                         "(--site-scores head)")
    if spec.get("snap_boxes") and not isinstance(spec.get("box_tokens"), Mapping):
        raise ValueError("findings prompt: snap_boxes needs the tokenizer's box_tokens (build the spec with "
                         "snap_boxes=True / radfm3d findings-prompt --snap-boxes on)")
    return shifts


def shifted_volume(pixel_values: torch.Tensor, shift: Sequence[int]) -> torch.Tensor:
    """``(M, C, H, W, D)`` moved by ``shift = (dh, dw, dd)`` voxels along its last three axes, the uncovered border
    filled with 0 (the preprocessed background; no wrap-around, unlike ``torch.roll``)."""
    out = torch.zeros_like(pixel_values)
    sizes = pixel_values.shape[-3:]
    src = tuple(slice(max(0, -v), n - max(0, v)) for v, n in zip(shift, sizes))
    dst = tuple(slice(max(0, v), n - max(0, -v)) for v, n in zip(shift, sizes))
    out[(..., *dst)] = pixel_values[(..., *src)]
    return out


def build_findings_prompt_config(tokenizer: Any, num_tokens: int = 24, threshold: float = 0.5,
                                 head_hidden: int = 512, schema: LabelSchema | None = None,
                                 site_scores: str = "patch_map", test_time_shifts: Any = None,
                                 snap_boxes: bool = False) -> dict[str, Any]:
    """The ``findings_prompt`` config entry for a label schema (default: the phantom benchmark's,
    :data:`radfm3d.data.structured_labels.PHANTOM_LABEL_SCHEMA`): class names, finding sites per region, every phrase
    tokenised with ``tokenizer`` (no special tokens).

    ``num_tokens``: prompt slots per image (the text is cut at a finding boundary to fit); ``threshold``: minimum
    patch score (probability a patch holds a finding x probability of the type) for a finding to be written;
    ``schema``: a :class:`radfm3d.data.structured_labels.LabelSchema` in the heads' output order; ``site_scores``: one
    of :data:`SITE_SCORES`; ``test_time_shifts``: voxel shifts of the scan whose head site scores are averaged with
    its own (:func:`parse_shifts` forms; needs ``site_scores="head"``); ``snap_boxes``: ``generate`` moves the LLM's
    grounding boxes onto the head's finding boxes (:mod:`radfm3d.modeling.box_snapping`; stores how ``tokenizer``
    writes boxes).
    """
    if schema is None:
        from radfm3d.data.structured_labels import PHANTOM_LABEL_SCHEMA

        schema = PHANTOM_LABEL_SCHEMA
    modality_names = list(schema.modality_names)
    regions, structures, finding_types = list(schema.regions), list(schema.structures), list(schema.finding_types)
    region_sites = [[[structures.index(structure), [finding_types.index(t) for t in types]]
                     for structure, types in schema.finding_sites[region]] for region in regions]
    names = dict(schema.structure_names)
    phrases = {"prefix": PHRASE_PREFIX, "comma": ",", "semicolon": ";", "period": ".", "none": " no findings",
               "filler": " "}
    phrases.update({f"modality:{i}": f" {n}" for i, n in enumerate(modality_names)})
    phrases.update({f"region:{i}": f" {n}" for i, n in enumerate(regions)})
    phrases.update({f"structure:{i}": f" {names[s]}" for i, s in enumerate(structures)})
    phrases.update({f"type:{i}": f" {t}" for i, t in enumerate(finding_types)})
    token_ids = {k: [int(i) for i in tokenizer.encode(v, add_special_tokens=False)] for k, v in phrases.items()}
    if len(token_ids["filler"]) != 1:
        raise ValueError(f"the tokenizer splits the filler {phrases['filler']!r} into {token_ids['filler']}")
    shifts = check_reading_options({"site_scores": site_scores, "test_time_shifts": test_time_shifts})
    spec = {"num_tokens": int(num_tokens), "threshold": float(threshold), "head_hidden": int(head_hidden),
            "site_scores": site_scores, **({"test_time_shifts": shifts} if shifts else {}),
            **({"snap_boxes": True, "box_tokens": build_box_tokens(tokenizer)} if snap_boxes else {}),
            "structures": structures, "finding_types": finding_types, "regions": regions,
            "modality_names": modality_names, "region_sites": region_sites, "phrases": phrases,
            "token_ids": token_ids}
    longest_empty = max(sum(len(token_ids[k]) for k in _phrase_keys(spec, m, r, []))
                        for m in range(len(modality_names)) for r in range(len(regions)))
    if longest_empty > spec["num_tokens"]:
        raise ValueError(f"num_tokens={num_tokens} cannot hold a reading without findings ({longest_empty} tokens)")
    return spec


def _phrase_keys(spec: Mapping[str, Any], modality: int, region: int, findings: Sequence[tuple[int, int]]
                 ) -> list[str]:
    """Phrase keys of one reading: prefix, modality, region, then ``structure type`` pairs (or "no findings")."""
    keys = ["prefix", f"modality:{modality}", "comma", f"region:{region}", "semicolon"]
    if not findings:
        keys.append("none")
    for k, (structure, finding_type) in enumerate(findings):
        keys += (["comma"] if k else []) + [f"structure:{structure}", f"type:{finding_type}"]
    return keys + ["period"]


class FindingsPrompter(nn.Module):
    """Heads over one image's resampler latents and patch tokens -> its reading and the reading's token ids.

    Same parameters as the vision pre-training wrapper (both built by
    :func:`radfm3d.modeling.heads.build_finding_heads`), so its trained heads load unchanged. Frozen (never trained through the LLM loss).
    """

    def __init__(self, spec: Mapping[str, Any], dim: int, num_latents: int) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.head, self.patch_head = build_finding_heads(
            dim, num_latents, len(self.spec["structures"]), len(self.spec["finding_types"]),
            int(self.spec.get("head_hidden", 512)), num_modalities=len(self.spec["modality_names"]),
            num_regions=len(self.spec["regions"]))
        self.test_time_shifts = check_reading_options(self.spec)
        self.site_scores = str(self.spec.get("site_scores", "patch_map"))
        self.detector: nn.Module | None = None
        if self.spec.get("detector"):
            from radfm3d.modeling.detector import FindingDetector

            self.detector = FindingDetector.from_config(self.spec["detector"])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FindingsPrompter:
        """Always in eval mode: the prompter is a frozen reader, so the detector's batch-norm statistics must not move
        while the LLM stage trains the model around it."""
        return super().train(False)

    @property
    def num_tokens(self) -> int:
        return int(self.spec["num_tokens"])

    def _map_scores(self, boxes: torch.Tensor, patch_tokens: torch.Tensor, grid: Sequence[int],
                    pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Per site and type, the best cell of the finding map (detector, else patch head) whose centre lies in the
        site's predicted structure box ``boxes (M, S, 6)`` -> ``(M, S, n_types)``."""
        if self.detector is not None:
            if pixel_values is None:
                raise ValueError("this findings prompt has a detector: read() needs pixel_values")
            cells, grid = self.detector(pixel_values)
            cells = cells.float()
        else:
            cells = self.patch_head(patch_tokens.float())
        finding_prob = torch.sigmoid(cells[..., 0:1]) * cells[..., 1:].softmax(-1)  # (M, T, n_types)
        nh, nw, nd = (int(g) for g in grid)
        axes = [(torch.arange(n, device=boxes.device, dtype=torch.float32) + 0.5) / n for n in (nh, nw, nd)]
        centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (T, 3) h w d order
        inside = ((centres >= boxes[..., None, :3] - BOX_MARGIN) & (centres <= boxes[..., None, 3:] + BOX_MARGIN)
                  ).all(-1)  # (M, S, T)
        return (inside[..., None] * finding_prob[:, None]).amax(dim=2)

    @torch.no_grad()
    def read(self, latents: torch.Tensor, patch_tokens: torch.Tensor, grid: Sequence[int],
             pixel_values: torch.Tensor | None = None, threshold: float | None = None,
             shifted_latents: Sequence[torch.Tensor] = ()) -> list[dict[str, Any]]:
        """``latents (M, N, dim)``, ``patch_tokens (M, nh*nw*nd, dim)``, patch ``grid``, and, for a prompter with a
        :class:`~radfm3d.modeling.detector.FindingDetector`, the images ``pixel_values (M, C, H, W, D)`` -> per image
        ``{"modality": int, "region": int, "findings": [(structure, type, score), ...]}`` (score-sorted, above the
        threshold; indices into the spec's lists). The finding map comes from the detector when there is one (on its
        own, finer grid), else from the patch head over the ViT's patch tokens; with ``site_scores: "head"`` there is
        no map: each site's score is the latent head's own ``sigmoid(finding_present) x softmax(finding_type)``.
        ``threshold`` overrides the spec's (e.g. ``-1``: every site with its best type, to score thresholds).
        ``shifted_latents``: the latents of the scans moved by the spec's ``test_time_shifts`` (the model computes
        them); the head's site scores are then averaged over the scan and its shifted copies (modality, region and
        boxes stay the unshifted scan's). Why: a 2-10 mm finding cut by a 16x16x4 patch border shows in two patches
        at partial strength; a shift of a few voxels moves the border (measured on val sites: bundle docs)."""
        out = self.head(latents.float())
        if self.site_scores == "head":
            scores = torch.stack([torch.sigmoid(o["finding_present"])[..., None] * o["finding_type"].softmax(-1)
                                  for o in [out, *(self.head(s.float()) for s in shifted_latents)]]).mean(0)
        else:
            scores = self._map_scores(out["structure_box"], patch_tokens, grid, pixel_values)
        modality, region = out["modality"].argmax(-1).tolist(), out["region"].argmax(-1).tolist()
        scores = scores.tolist()  # one device-to-host copy, not one per (image, site, type) inside the loop
        threshold = float(self.spec["threshold"] if threshold is None else threshold)
        readings = []
        for m in range(latents.shape[0]):
            candidates = []
            for structure, types in self.spec["region_sites"][region[m]]:
                site_scores = scores[m][structure]
                best = max(types, key=lambda t: site_scores[t])
                score = float(site_scores[best])
                if score > threshold:
                    candidates.append((int(structure), int(best), round(score, 4)))
            candidates.sort(key=lambda c: -c[2])
            readings.append({"modality": int(modality[m]), "region": int(region[m]), "findings": candidates})
        return readings

    @property
    def snaps_boxes(self) -> bool:
        """Whether ``generate`` moves the LLM's grounding boxes onto the head's boxes (spec key ``snap_boxes``)."""
        return bool(self.spec.get("snap_boxes"))

    @torch.no_grad()
    def site_boxes(self, latents: torch.Tensor, spatial_size: Sequence[int],
                   shifted_latents: Sequence[torch.Tensor] = ()) -> list[dict[str, list[tuple[int, ...]]]]:
        """The head's boxes for the finding sites of the region it reads, per image, as 0..99 box values on a grid of
        ``spatial_size`` voxels: ``{"finding": [box per site], "structure": [box per site]}``. ``latents (M, N,
        dim)``; ``shifted_latents``: those of the scans moved by the spec's ``test_time_shifts`` (in that order):
        their finding boxes, moved back by the shift, are averaged with the scan's own (structure boxes: the scan's
        own). Candidates for :func:`radfm3d.modeling.box_snapping.snap_box`."""
        from radfm3d.text.boxes import grid_box_to_normalised

        out = self.head(latents.float())
        sizes = torch.tensor([float(n) for n in spatial_size] * 2, device=latents.device)
        finding = [out["finding_box"]]
        for shift, shifted in zip(self.test_time_shifts, shifted_latents):
            undo = torch.tensor([float(v) for v in shift] * 2, device=latents.device) / sizes
            finding.append(self.head(shifted.float())["finding_box"] - undo)
        finding_box = torch.stack(finding).mean(0) * sizes  # (M, S, 6) grid voxels
        structure_box = out["structure_box"] * sizes
        regions = out["region"].argmax(-1).tolist()
        boxes = []
        for m, region in enumerate(regions):
            sites = [int(structure) for structure, _ in self.spec["region_sites"][region]]
            boxes.append({kind: [grid_box_to_normalised(grid[m, s].tolist(), spatial_size) for s in sites]
                          for kind, grid in (("finding", finding_box), ("structure", structure_box))})
        return boxes

    def token_ids(self, readings: Sequence[Mapping[str, Any]], device: torch.device | str = "cpu") -> torch.Tensor:
        """Readings -> ``(M, num_tokens)`` long ids (filler-padded; findings that do not fit are dropped, lowest
        score first)."""
        ids = self.spec["token_ids"]
        rows = []
        for r in readings:
            findings = [(s, t) for s, t, _ in r["findings"]]
            while True:
                row = [i for key in _phrase_keys(self.spec, r["modality"], r["region"], findings) for i in ids[key]]
                if len(row) <= self.num_tokens or not findings:
                    break
                findings = findings[:-1]
            rows.append(row[: self.num_tokens] + ids["filler"] * (self.num_tokens - len(row)))
        return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), self.num_tokens)

    def text(self, reading: Mapping[str, Any]) -> str:
        """The reading as the text the LLM receives (without the filler)."""
        keys = _phrase_keys(self.spec, reading["modality"], reading["region"],
                            [(s, t) for s, t, _ in reading["findings"]])
        return "".join(self.spec["phrases"][k] for k in keys).strip()

    def describe(self, reading: Mapping[str, Any]) -> dict[str, Any]:
        """A reading with names instead of indices (for JSON outputs)."""
        spec = self.spec
        return {"text": self.text(reading), "modality": spec["modality_names"][reading["modality"]],
                "region": spec["regions"][reading["region"]],
                "findings": [{"structure": spec["structures"][s], "type": spec["finding_types"][t], "score": p}
                             for s, t, p in reading["findings"]]}
