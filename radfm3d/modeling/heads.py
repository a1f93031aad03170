# Copyright (c) radfm3d contributors. Apache-2.0.
"""Heads on the resampler's visual tokens, trained while pre-training the vision side.

:class:`StructuredFindingsHead` reads the ``(B, N, dim)`` latents the LLM will later receive and predicts the
structured labels of :mod:`radfm3d.data.structured_labels`. Because it sees the latents through one hidden layer,
whatever it learns to read is present in the very tokens handed to the projector and the LLM. A model without a
findings prompt does not need them at inference; with one, the same two heads live inside the model
(:class:`radfm3d.modeling.findings_prompt.FindingsPrompter`) and write the reading the LLM receives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from radfm3d.data.structured_labels import LabelSchema

__all__ = ["StructuredFindingsHead", "VisionPretrainingModel", "build_finding_heads", "read_head_file"]

N_MODALITY, N_REGION, N_COUNT, BOX = 3, 3, 4, 6


class StructuredFindingsHead(nn.Module):
    """``latents (B, N, dim)`` -> dict of logits / regressions (shapes as the label table, ``S`` structures).

    Per structure: ``structure_present (B, S)``, ``structure_box (B, S, 6)`` (sigmoid, in [0, 1]),
    ``finding_present (B, S)``, ``finding_count (B, S, 4)``, ``finding_type (B, S, n_types)``,
    ``finding_box (B, S, 6)``, ``finding_size (B, S)``; per scan: ``modality (B, num_modalities)`` (3: CT, MRI T1,
    MRI T2), ``region (B, num_regions)`` (3: head, chest, abdomen), ``total_count (B, 4)``.
    """

    def __init__(self, dim: int, num_tokens: int, num_structures: int, num_finding_types: int,
                 hidden: int = 512, num_modalities: int = N_MODALITY, num_regions: int = N_REGION) -> None:
        super().__init__()
        self.num_structures, self.num_finding_types = int(num_structures), int(num_finding_types)
        per_structure = 1 + BOX + 1 + N_COUNT + self.num_finding_types + BOX + 1
        self._split = [int(num_modalities), int(num_regions), N_COUNT, self.num_structures * per_structure]
        self.net = nn.Sequential(
            nn.Flatten(1), nn.LayerNorm(num_tokens * dim), nn.Linear(num_tokens * dim, hidden), nn.GELU(),
            nn.Linear(hidden, sum(self._split)),
        )
        self.per_structure = per_structure

    def finding_box_rows(self) -> torch.Tensor:
        """Indices of the last ``Linear``'s output rows that give ``finding_box``, structure by structure, in
        ``(S * 6,)`` order (for re-fitting those outputs alone: :mod:`radfm3d.engine.box_refit`)."""
        offset = sum(self._split[:3]) + 1 + BOX + 1 + N_COUNT + self.num_finding_types
        return torch.tensor([offset + s * self.per_structure + k for s in range(self.num_structures)
                             for k in range(BOX)])

    def forward(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        modality, region, total_count, rest = self.net(latents).split(self._split, dim=-1)
        rest = rest.reshape(latents.shape[0], self.num_structures, self.per_structure)
        parts = rest.split([1, BOX, 1, N_COUNT, self.num_finding_types, BOX, 1], dim=-1)
        present, s_box, f_present, f_count, f_type, f_box, f_size = parts
        return {
            "modality": modality, "region": region, "total_count": total_count,
            "structure_present": present.squeeze(-1), "structure_box": torch.sigmoid(s_box),
            "finding_present": f_present.squeeze(-1), "finding_count": f_count, "finding_type": f_type,
            "finding_box": torch.sigmoid(f_box), "finding_size": f_size.squeeze(-1),
        }


def read_head_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``structured_head.safetensors`` -> ``(tensors, detector config or None)`` (the config from its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    return load_file(str(path)), (json.loads(meta["detector"]) if meta.get("detector") else None)


def build_finding_heads(dim: int, num_tokens: int, num_structures: int, num_finding_types: int, hidden: int = 512,
                        num_modalities: int = N_MODALITY, num_regions: int = N_REGION
                        ) -> tuple[StructuredFindingsHead, nn.Linear]:
    """The two heads stage 0 trains and the findings prompt reads with: ``(head, patch_head)``, the
    :class:`StructuredFindingsHead` over the ``(B, num_tokens, dim)`` latents and ``Linear(dim, 1 + num_finding_types)``
    over each patch token (logit "a finding overlaps this patch" + finding-type logits). One builder, so the two
    owners' parameters always have the same names and shapes."""
    head = StructuredFindingsHead(dim, num_tokens, num_structures, num_finding_types, hidden,
                                  num_modalities=num_modalities, num_regions=num_regions)
    return head, nn.Linear(dim, 1 + int(num_finding_types))


class VisionPretrainingModel(nn.Module):
    """``RadFM3DForCausalLM``'s vision encoder + resampler with a :class:`StructuredFindingsHead` on top (and,
    optionally, a :class:`~radfm3d.modeling.detector.FindingDetector` on the images).

    ``forward(pixel_values (B, C, H, W, D))`` -> the head's dict. ``save_pretrained`` writes the whole
    ``RadFM3DForCausalLM`` (so the next stage starts from it by folder name) and the heads beside it
    (``structured_head.safetensors``, ignored by ``from_pretrained``; the detector's config in its metadata).
    """

    head_file = "structured_head.safetensors"
    head_prefixes = ("head.", "patch_head.", "detector.")

    def __init__(self, model: nn.Module, num_structures: int | None = None,
                 num_finding_types: int | None = None, hidden: int = 512, schema: LabelSchema | None = None,
                 detector: Mapping[str, Any] | bool | None = None, detector_only: bool = False) -> None:
        """``schema``: the :class:`radfm3d.data.structured_labels.LabelSchema` the heads predict (default: the
        phantom benchmark's); ``num_structures`` / ``num_finding_types`` override its sizes. ``detector``: ``True`` or
        a (partial) config of :func:`radfm3d.modeling.detector.detector_config` adds a finding detector.
        ``detector_only``: ``forward`` runs only the detector (no encoder pass: it takes inputs of any size its
        strides divide, e.g. crops); the heads and the VLM are still saved with it."""
        super().__init__()
        if schema is None:
            from radfm3d.data.structured_labels import PHANTOM_LABEL_SCHEMA

            schema = PHANTOM_LABEL_SCHEMA
        self.model = model
        cfg = model.config
        self.head, self.patch_head = build_finding_heads(
            cfg.vision.hidden_size, int(cfg.num_image_tokens),
            len(schema.structures) if num_structures is None else num_structures,
            len(schema.finding_types) if num_finding_types is None else num_finding_types, hidden,
            num_modalities=len(schema.modality_names), num_regions=len(schema.regions))
        from radfm3d.modeling.detector import FindingDetector, detector_config

        self.detector_config = detector_config(detector, cfg.vision.in_channels, self.head.num_finding_types)
        self.detector = FindingDetector.from_config(self.detector_config) if self.detector_config else None
        if detector_only and self.detector is None:
            raise ValueError("detector_only needs a detector (detector=True or a detector config)")
        self.detector_only = bool(detector_only)

    @property
    def config(self) -> Any:
        return self.model.config

    def visual_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D)`` -> resampler latents ``(B, N, dim)`` (before the projector)."""
        return self.model.get_visual_latents(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head's dict plus ``patch_logits (B, nh*nw*nd, 1 + n_types)`` from the encoder's patch tokens and
        ``patch_grid (B, 3)`` (the patch grid, so a loss can place boxes on it); with a detector also
        ``detector_logits (B, h*w*d, 1 + n_types)`` and ``detector_grid (B, 3)`` (only these two when
        ``detector_only``)."""
        out: dict[str, torch.Tensor] = {}
        if not self.detector_only:
            latents, tokens, grid = self.model.get_visual_latents(pixel_values, return_patch_tokens=True)
            out = self.head(latents)
            out["patch_logits"] = self.patch_head(tokens)
            out["patch_grid"] = torch.tensor(grid, device=tokens.device).expand(tokens.shape[0], 3)
        if self.detector is not None:
            cells, cell_grid = self.detector(pixel_values)
            out["detector_logits"] = cells
            out["detector_grid"] = torch.tensor(cell_grid, device=cells.device).expand(cells.shape[0], 3)
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        from safetensors.torch import save_file

        from radfm3d.utils import atomic_write

        out = Path(save_directory)
        self.model.save_pretrained(out, **kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if k.startswith(self.head_prefixes)}
        metadata = {"detector": json.dumps(self.detector_config)} if self.detector_config else None
        atomic_write(out / self.head_file, lambda tmp: save_file(state, tmp, metadata=metadata))
        return out

    def load_head(self, folder: str | os.PathLike, strict: bool = True) -> list[str]:
        """Load the heads saved by :meth:`save_pretrained`; returns the names of head weights not in the file
        (``strict=False`` allows a file from an older head layout, e.g. without ``patch_head``)."""
        return self.load_head_state(read_head_file(Path(folder) / self.head_file)[0], strict, source=str(folder))

    def load_head_state(self, state: Mapping[str, torch.Tensor], strict: bool = True, source: str = "heads"
                        ) -> list[str]:
        """:meth:`load_head` from tensors already read (e.g. by :func:`read_head_file`)."""
        if not any(k.startswith(self.head_prefixes) for k in state):  # layout before the patch head
            state = {f"head.{k}": v for k, v in state.items()}
        own = {k: v for k, v in self.state_dict().items() if k.startswith(self.head_prefixes)}
        missing = sorted(set(own) - set(state))
        if strict and missing:
            raise ValueError(f"{source}: head weights missing {missing[:4]}")
        own.update({k: v for k, v in state.items() if k in own})
        self.load_state_dict(own, strict=False)
        return missing
