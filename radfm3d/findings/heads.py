# Copyright (c) radfm3d contributors. Apache-2.0.
"""The findings head on the resampler's visual tokens, sized by a label schema, and the stage-0 wrapper.

:class:`StructuredFindingsHead` reads the ``(B, N, dim)`` latents the LLM receives and predicts the structured labels
of :mod:`radfm3d.findings.labels` for the outputs a :class:`~radfm3d.findings.schema.LabelSchema` declares. Because it
sees the latents through one hidden layer, whatever it learns to read is present in the very tokens handed to the
projector and the LLM. The same head lives in a findings model (:class:`radfm3d.findings.reader.FindingsReader`)
and writes the reading the LLM receives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radfm3d.findings.schema import LabelSchema

__all__ = ["StructuredFindingsHead", "VisionPretrainingModel", "read_head_file", "BOX", "HEAD_FILE"]

BOX = 6
#: the heads of a stage-0 run, saved beside the exported model
HEAD_FILE = "structured_head.safetensors"


def _layout(schema: LabelSchema) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """``(per-scan outputs, per-structure outputs, trailing per-scan outputs)`` as ``(name, width)``, in the order of
    the last layer's rows (a schema with every phantom output has the layout of the shipped model's head)."""
    counts = schema.max_count + 1
    scan = [(name, width) for name, width in (("modality", len(schema.modalities)), ("region", len(schema.regions)),
                                              ("total_count", counts)) if schema.has(name)]
    structure = [(name, width) for name, width in (
        ("structure_present", 1), ("structure_box", BOX), ("finding_present", 1), ("finding_count", counts),
        ("finding_type", len(schema.finding_types)), ("finding_box", BOX), ("finding_size", 1))
        if schema.has(name) or (name == "structure_present" and schema.structures)]
    tail = [("flags", len(schema.flags))] if schema.has("flags") else []
    return scan, structure, tail


class StructuredFindingsHead(nn.Module):
    """``latents (B, N, dim)`` -> dict of logits / regressions for the schema's outputs (``S`` structures, ``C`` =
    ``max_count``): per scan ``modality (B, n_modalities)``, ``region (B, n_regions)``, ``total_count (B, C+1)``,
    ``flags (B, n_flags)`` (logits); per structure ``structure_present (B, S)``, ``structure_box (B, S, 6)`` (sigmoid,
    in [0, 1]), ``finding_present (B, S)``, ``finding_count (B, S, C+1)``, ``finding_type (B, S, n_types)``,
    ``finding_box (B, S, 6)`` (sigmoid), ``finding_size (B, S)``."""

    def __init__(self, dim: int, num_tokens: int, schema: LabelSchema, hidden: int = 512) -> None:
        super().__init__()
        self.schema = schema
        self.num_structures = len(schema.structures)
        self._scan, self._structure, self._tail = _layout(schema)
        self.per_structure = sum(w for _, w in self._structure)
        widths = [w for _, w in self._scan] + [self.num_structures * self.per_structure] + [w for _, w in self._tail]
        self._split = widths
        self.net = nn.Sequential(
            nn.Flatten(1), nn.LayerNorm(num_tokens * dim), nn.Linear(num_tokens * dim, hidden), nn.GELU(),
            nn.Linear(hidden, sum(widths)),
        )

    def finding_box_rows(self) -> torch.Tensor:
        """Indices of the last ``Linear``'s output rows that give ``finding_box``, structure by structure, in
        ``(S * 6,)`` order (for re-fitting those outputs alone: :mod:`radfm3d.findings.box_refit`)."""
        names = [name for name, _ in self._structure]
        if "finding_box" not in names:
            raise ValueError(f"the label schema {self.schema.name!r} has no finding boxes")
        start = sum(w for _, w in self._scan)
        offset = start + sum(w for name, w in self._structure[: names.index("finding_box")])
        return torch.tensor([offset + s * self.per_structure + k for s in range(self.num_structures)
                             for k in range(BOX)])

    def forward(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = list(self.net(latents).split(self._split, dim=-1))
        out: dict[str, torch.Tensor] = {}
        for name, _ in self._scan:
            out[name] = parts.pop(0)
        rest = parts.pop(0).reshape(latents.shape[0], self.num_structures, self.per_structure)
        for (name, _), value in zip(self._structure, rest.split([w for _, w in self._structure], dim=-1)):
            if name.endswith("_box"):
                value = torch.sigmoid(value)
            elif value.shape[-1] == 1 and name in ("structure_present", "finding_present", "finding_size"):
                value = value.squeeze(-1)
            out[name] = value
        for name, _ in self._tail:
            out[name] = parts.pop(0)
        return out


def read_head_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``structured_head.safetensors`` -> its tensors (``head.*``)."""
    from safetensors.torch import load_file

    return load_file(str(path))


class VisionPretrainingModel(nn.Module):
    """``RadFM3DForCausalLM``'s vision encoder + resampler with a :class:`StructuredFindingsHead` on top.

    ``forward(pixel_values (B, C, H, W, D))`` -> the head's dict. ``save_pretrained`` writes the whole
    ``RadFM3DForCausalLM`` (so the next stage starts from it by folder name), the head beside it
    (``structured_head.safetensors``, ignored by ``from_pretrained``) and the schema (``label_schema.json``).
    """

    head_file = HEAD_FILE

    def __init__(self, model: nn.Module, schema: LabelSchema, hidden: int = 512) -> None:
        super().__init__()
        self.model = model
        self.schema = schema
        cfg = model.config
        self.head = StructuredFindingsHead(cfg.vision.hidden_size, int(cfg.num_image_tokens), schema, hidden)

    @property
    def config(self) -> Any:
        return self.model.config

    def visual_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D)`` -> resampler latents ``(B, N, dim)`` (before the projector)."""
        return self.model.get_visual_latents(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.model.get_visual_latents(pixel_values))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        from safetensors.torch import save_file

        from radfm3d.utils import atomic_write

        out = Path(save_directory)
        self.model.save_pretrained(out, **kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith("head.")}
        atomic_write(out / self.head_file, lambda tmp: save_file(state, tmp))
        self.schema.save(out)
        return out

    def load_head(self, folder: str | os.PathLike) -> None:
        """Load the head saved by :meth:`save_pretrained`."""
        self.load_head_state(read_head_file(Path(folder) / self.head_file), source=str(folder))

    def load_head_state(self, state: Mapping[str, torch.Tensor], source: str = "heads") -> None:
        """Load ``head.*`` tensors (other keys, e.g. an older file's ``patch_head.*``, are ignored); shapes must match
        the schema's head."""
        own = {k for k in self.state_dict() if k.startswith("head.")}
        picked = {k: v for k, v in state.items() if k in own}
        missing = sorted(own - set(picked))
        if missing:
            from radfm3d.errors import RadFM3DInputError

            raise RadFM3DInputError(source, f"head weights missing {missing[:4]}")
        try:
            self.load_state_dict(picked, strict=False)
        except RuntimeError as err:
            from radfm3d.errors import RadFM3DInputError

            raise RadFM3DInputError(source, f"the heads do not fit the label schema {self.schema.name!r}: "
                                    f"{str(err).splitlines()[-1].strip()}") from None
