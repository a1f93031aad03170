# Copyright (c) radfm3d contributors. Apache-2.0.
"""``RadFM3DFindingsModel``: a ``RadFM3DForCausalLM`` with a findings reader attached.

Each image's placeholders are its visual tokens followed by ``reader.num_tokens`` slots holding the embedded reading
(:mod:`radfm3d.findings.reader`); with ``snap_boxes`` the grounding boxes of each answer are moved onto the head's
finding boxes (:mod:`radfm3d.findings.box_snapping`, on the decoded text). The reading, the snapping and
:meth:`RadFM3DFindingsModel.read_findings` share one encoder pass per image (plus one per test-time shift): the
encoder outputs of the last batch of images are kept and reused while the same images come back (compared by
value), in eval mode without gradients.

Checkpoint folder: the base model's files (``config.json`` with ``model_type`` ``"radfm3d_findings"``, the reader
settings under ``reader`` and ``auto_map`` naming this class, so ``RadFM3DForCausalLM.from_pretrained`` loads it as
one), the head's weights under ``reader.head.*`` in ``model.safetensors``, ``label_schema.json`` and the tokenizer
(the processor files) the reading's phrases are tokenised with when loading.

Older folders (``findings_prompt`` in a ``radfm3d`` config, weights under ``findings_prompter.*``) load through
:meth:`RadFM3DFindingsModel.from_pretrained` with their config migrated in memory (:func:`migrate_config`);
``radfm3d findings-migrate FOLDER`` rewrites them on disk (weights untouched).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from radfm3d.errors import RadFM3DInputError
from radfm3d.findings.reader import READER_KEYS, FindingsReader, reader_settings, shifted_volume
from radfm3d.findings.schema import SCHEMA_FILE, LabelSchema, load_schema
from radfm3d.modeling.configuration import RadFM3DConfig
from radfm3d.modeling.model import RadFM3DForCausalLM

__all__ = ["RadFM3DFindingsConfig", "RadFM3DFindingsModel", "migrate_config", "legacy_schema", "attach_reader"]

_CLASS_PATH = "radfm3d.findings.model.RadFM3DFindingsModel"
#: weight prefixes of the older layout -> their name now (None: dropped, the part no longer exists)
_LEGACY_PREFIXES = {"findings_prompter.head.": "reader.head.", "findings_prompter.patch_head.": None,
                    "findings_prompter.detector.": None}


class RadFM3DFindingsConfig(RadFM3DConfig):
    """:class:`~radfm3d.modeling.configuration.RadFM3DConfig` plus ``reader`` (the reader settings,
    :data:`radfm3d.findings.reader.READER_KEYS`) and ``label_schema`` (the schema file beside the model)."""

    model_type = "radfm3d_findings"

    reader: dict | None = None
    label_schema: str = SCHEMA_FILE

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        try:
            self.reader = reader_settings(self.reader or {})
        except ValueError as err:
            raise ValueError(f"config reader: {err}") from None

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens + reading slots per image."""
        return int(self.num_image_tokens) + int(self.reader["num_tokens"])

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["auto_map"] = {"AutoModelForCausalLM": _CLASS_PATH}
        out["architectures"] = ["RadFM3DFindingsModel"]
        return out


def legacy_schema(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A label schema dict from an older config's ``findings_prompt`` spec (its class names, sites and phrases)."""
    phrases = dict(spec["phrases"])
    structures, types = list(spec["structures"]), list(spec["finding_types"])
    regions = list(spec["regions"])
    return {
        "format": "radfm3d-label-schema", "version": 1, "name": "migrated",
        "outputs": ["modality", "region", "total_count", "structure_present", "structure_box", "finding_present",
                    "finding_count", "finding_type", "finding_box", "finding_size"],
        "max_count": 3,
        "modalities": [{"name": n, "phrase": phrases[f"modality:{i}"]} for i, n in enumerate(spec["modality_names"])],
        "regions": [{"name": n, "phrase": phrases[f"region:{i}"]} for i, n in enumerate(regions)],
        "structures": [{"name": n, "phrase": phrases[f"structure:{i}"]} for i, n in enumerate(structures)],
        "finding_types": [{"name": n, "phrase": phrases[f"type:{i}"]} for i, n in enumerate(types)],
        "finding_sites": {regions[r]: [[structures[s], [types[t] for t in ts]] for s, ts in sites]
                          for r, sites in enumerate(spec["region_sites"])},
        "phrases": {k: v for k, v in phrases.items() if ":" not in k},
    }


def migrate_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """An older ``config.json`` dict with ``findings_prompt`` -> the findings layout (``reader`` settings,
    ``label_schema``, ``auto_map``); other dicts are returned unchanged. The phrases, class names and sites go to the
    schema file (:func:`legacy_schema`), the stored token ids are dropped (the tokenizer gives them). Raises
    ``ValueError`` for readings this version no longer has (patch-map site scores, a finding detector)."""
    data = dict(data)
    spec = data.pop("findings_prompt", None)
    if not spec:
        return data
    if spec.get("site_scores", "patch_map") != "head" or spec.get("detector"):
        raise ValueError("this findings prompt reads sites from a patch map or a finding detector, which radfm3d no "
                         "longer has; re-attach the reader with `radfm3d findings-prompt`")
    data["reader"] = {k: spec[k] for k in READER_KEYS if k in spec}
    data["reader"]["snap_boxes"] = bool(spec.get("snap_boxes", False))
    data["label_schema"] = SCHEMA_FILE
    data["model_type"] = RadFM3DFindingsConfig.model_type
    data["architectures"] = ["RadFM3DFindingsModel"]
    data["auto_map"] = {"AutoModelForCausalLM": _CLASS_PATH}
    return data


def _load_tokenizer(folder: Path) -> Any:
    from radfm3d.processing import RadFM3DProcessor

    try:
        return RadFM3DProcessor.from_pretrained(folder).tokenizer
    except (OSError, ValueError) as err:
        raise RadFM3DInputError(folder, f"a findings model needs its tokenizer beside config.json (the processor "
                                f"files): {err}") from None


class RadFM3DFindingsModel(RadFM3DForCausalLM):
    """``RadFM3DForCausalLM`` + ``reader`` (:class:`~radfm3d.findings.reader.FindingsReader`).

    ``RadFM3DFindingsModel(config, language_model, schema=..., tokenizer=...)``; usually built by
    :func:`attach_reader` or loaded with ``from_pretrained`` (which reads ``label_schema.json`` and the tokenizer of
    the folder)."""

    config_class = RadFM3DFindingsConfig

    def __init__(self, config: RadFM3DFindingsConfig, language_model: PreTrainedModel | None = None,
                 schema: LabelSchema | Mapping[str, Any] | str | os.PathLike | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__(config, language_model=language_model)
        if schema is None:
            raise ValueError("RadFM3DFindingsModel needs its label schema (schema=...)")
        self.reader = FindingsReader(load_schema(schema), config.reader, config.vision.hidden_size,
                                     int(config.num_image_tokens))
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.reader.tokenize(tokenizer)
        self._encoded: dict[str, Any] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def _migrate_config(cls, data: dict[str, Any], folder: Path) -> dict[str, Any]:
        try:
            return migrate_config(data)
        except ValueError as err:
            raise RadFM3DInputError(folder / "config.json", str(err)) from None

    @classmethod
    def _build_loaded(cls, config: RadFM3DConfig, language_model: PreTrainedModel, folder: Path | None
                      ) -> RadFM3DFindingsModel:
        if folder is None:
            raise RadFM3DInputError("findings model", "load a findings model from a folder (it needs its schema)")
        schema_file = folder / config.label_schema
        if schema_file.is_file():
            schema: Any = schema_file
        else:
            raw = json.loads((folder / "config.json").read_text())
            if not raw.get("findings_prompt"):
                raise RadFM3DInputError(schema_file, "label schema file not found")
            schema = legacy_schema(raw["findings_prompt"])
        return cls(config, language_model=language_model, schema=schema, tokenizer=_load_tokenizer(folder))

    def _own_parts(self) -> list[nn.Module]:
        return [*super()._own_parts(), self.reader]

    def _upgrade_checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            for old, new in _LEGACY_PREFIXES.items():
                if key.startswith(old):
                    key = None if new is None else new + key[len(old):]
                    break
            if key is not None:
                out[key] = value
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, save_base: bool = False, **kwargs: Any
                        ) -> list[Path]:  # type: ignore[override]
        """The base files plus ``label_schema.json``."""
        written = super().save_pretrained(save_directory, save_base=save_base, **kwargs)
        written.append(self.reader.schema.save(Path(save_directory) / self.config.label_schema))
        return written

    def train(self, mode: bool = True) -> RadFM3DFindingsModel:
        self._encoded = None
        return super().train(mode)

    # ------------------------------------------------------------------ images
    def _encode_shared(self, images: torch.Tensor) -> dict[str, Any]:
        """``images (M, C, H, W, D)`` -> ``{"latents", "shifted" (per test-time shift), "outputs" (the head's)}``;
        reused while the same images come back (eval mode, no gradients), else recomputed."""
        reuse = not self.training and not torch.is_grad_enabled()
        cached = self._encoded
        if reuse and cached is not None and cached["images"].shape == images.shape \
                and cached["images"].device == images.device and torch.equal(cached["images"], images):
            return cached
        latents = self.get_visual_latents(images)
        shifted = [self.get_visual_latents(shifted_volume(images, shift)) for shift in self.reader.test_time_shifts]
        with torch.no_grad():
            outputs = self.reader.head(latents.detach().float())
        encoded = {"images": images.detach().clone(), "latents": latents, "shifted": shifted, "outputs": outputs}
        self._encoded = encoded if reuse else None
        return encoded

    def _encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens followed by the embedded reading: ``(M, num_image_tokens + reader.num_tokens, hidden)``."""
        if self.tokenizer is None and self.reader.phrase_ids is None:
            raise RuntimeError("this findings model has no tokenizer to write its reading with")
        encoded = self._encode_shared(pixel_values)
        proj_dtype = next(self.projector.parameters()).dtype
        visual = self.projector(encoded["latents"].to(proj_dtype))
        readings = self.reader.read(encoded["latents"].detach(), [s.detach() for s in encoded["shifted"]],
                                    outputs=encoded["outputs"])
        ids = self.reader.token_ids(readings, device=visual.device)
        return torch.cat([visual, self.embed_tokens(ids).to(visual.dtype)], dim=1)

    @torch.no_grad()
    def read_findings(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None,
                      threshold: float | None = None) -> list[list[dict[str, Any]]]:
        """The reading of each real image, ``pixel_values (B, S, C, H, W, D)`` (or ``(B, C, H, W, D)``) -> B lists of
        :meth:`FindingsReader.describe` dicts; ``threshold`` overrides the reader's."""
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(1)
        mask = self._image_mask(pixel_values, image_mask)
        if not bool(mask.any()):
            return [[] for _ in range(pixel_values.shape[0])]
        param = next(self.vision_model.parameters())
        images = pixel_values[mask].to(device=param.device)
        encoded = self._encode_shared(images)
        readings = iter(self.reader.read(encoded["latents"], encoded["shifted"], threshold=threshold,
                                         outputs=encoded["outputs"]))
        return [[self.reader.describe(next(readings)) for real in row if real] for row in mask.tolist()]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                 **gen_kwargs: Any) -> Any:
        """``RadFM3DForCausalLM.generate``, then, with ``snap_boxes``, the boxes of each one-image answer moved onto
        the head's finding boxes (:func:`radfm3d.findings.box_snapping.snap_text` on the decoded answer; answers
        whose boxes change are re-encoded and the batch re-padded)."""
        out = super().generate(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               image_mask=image_mask, **gen_kwargs)
        if pixel_values is None or not self.reader.snaps_boxes or self.tokenizer is None:
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        snapped = self._snap(sequences, input_ids.shape[1], pixel_values, image_mask,
                             gen_kwargs.get("pad_token_id"), gen_kwargs.get("eos_token_id"))
        if isinstance(out, torch.Tensor):
            return snapped
        out.sequences = snapped
        return out

    def _snap(self, sequences: torch.Tensor, prompt_len: int, pixel_values: torch.Tensor,
              image_mask: torch.Tensor | None, pad: Any, eos: Any) -> torch.Tensor:
        from radfm3d.findings.box_snapping import snap_text

        default_eos, default_pad = self.generation_stop_ids()
        pad = default_pad if pad is None else pad
        eos = default_eos if eos is None else eos
        stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {pad}
        stops.discard(None)
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(1)
        mask = self._image_mask(pixel_values, image_mask)
        rows = sequences.tolist()
        single = [b for b in range(len(rows)) if int(mask[b].sum()) == 1]
        texts = {}
        for b in single:
            new = rows[b][prompt_len:]
            end = next((k for k, t in enumerate(new) if t in stops), len(new))
            text = self.tokenizer.decode(new[:end], skip_special_tokens=False)
            if "box" in text.lower():
                texts[b] = (text, end)
        if not texts:
            return sequences
        param = next(self.vision_model.parameters())
        images = torch.stack([pixel_values[b][mask[b]][0] for b in texts]).to(device=param.device)
        encoded = self._encode_shared(images)
        candidates = self.reader.site_boxes(encoded["latents"], images.shape[-3:], encoded["shifted"],
                                            outputs=encoded["outputs"])
        changed = False
        for (b, (text, end)), boxes in zip(texts.items(), candidates):
            new_text, _ = snap_text(text, boxes)
            if new_text != text:
                tail = rows[b][prompt_len + end:]
                rows[b] = rows[b][:prompt_len] + [int(i) for i in self.tokenizer.encode(
                    new_text, add_special_tokens=False)] + tail
                changed = True
        if not changed:
            return sequences
        width = max(len(row) for row in rows)
        filler = int(pad if pad is not None else 0)
        return torch.tensor([row + [filler] * (width - len(row)) for row in rows], dtype=sequences.dtype,
                            device=sequences.device)


def attach_reader(model: RadFM3DForCausalLM, schema: LabelSchema | Mapping[str, Any] | str | os.PathLike,
                  head_state: Mapping[str, torch.Tensor], tokenizer: Any, settings: Mapping[str, Any] | None = None
                  ) -> RadFM3DFindingsModel:
    """A :class:`RadFM3DFindingsModel` sharing ``model``'s parts (vision encoder, resampler, projector, LLM, extra
    token rows; a findings model's reader is replaced), with the reader's head loaded from ``head_state``
    (``head.*`` tensors, e.g. ``structured_head.safetensors``) and its phrases tokenised with ``tokenizer``."""
    schema = load_schema(schema)
    data = model.config.to_dict()
    for key in ("reader", "label_schema", "auto_map", "architectures", "model_type", "transformers_version"):
        data.pop(key, None)
    data["reader"] = dict(settings or {})
    config = RadFM3DFindingsConfig(**data)
    out = RadFM3DFindingsModel(config, language_model=model.language_model, schema=schema)
    for name in ("vision_model", "resampler", "projector", "extra_token_embeddings"):
        setattr(out, name, getattr(model, name))
    out.tokenizer = tokenizer
    head = {k[len("head."):]: v for k, v in head_state.items() if k.startswith("head.")}
    try:
        out.reader.head.load_state_dict(head, strict=True)
    except RuntimeError as err:
        raise RadFM3DInputError("heads", f"the heads do not fit the label schema {schema.name!r}: "
                                f"{str(err).splitlines()[-1].strip() if str(err) else err}") from None
    out.reader.tokenize(tokenizer)
    param = next(out.vision_model.parameters())
    out.reader.to(device=param.device, dtype=param.dtype)
    out.train(model.training)
    return out


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(RadFM3DFindingsConfig.model_type, RadFM3DFindingsConfig)
        AutoModelForCausalLM.register(RadFM3DFindingsConfig, RadFM3DFindingsModel)
    except ValueError:  # already registered
        pass


_register()
