# Copyright (c) radfm3d contributors. Apache-2.0.
"""Finding detector: a small 3D CNN that maps the preprocessed volume to a finding map on a grid finer than the ViT's.

Why it exists (measured, bundle docs of 0.5.0): the findings prompt's reading of small findings (2-20 mm nodules,
calcifications, cysts) was capped by the ViT's 16x16x4-voxel patches, whose linear patch embedding is trained by the
few thousand phantom scans a CPU stage 0 can see; retraining the heads alone on fresh scans did not move it. A CNN
keeps full resolution in its first layers, so a 3-voxel blob stays a 3-voxel blob, and it trains on 2 CPU cores
(about 0.06 s per 128x128x32 scan forward + backward at the default widths). It only feeds the reading: the visual
tokens the LLM receives and the resampler are unchanged, so a trained LLM stage keeps working on top of it.

Output: per cell, a logit "a finding overlaps this cell" and finding-type logits, the same layout as the ViT patch
head (:func:`radfm3d.modeling.heads.build_finding_heads`), in ``(h w d)`` order, so
:func:`radfm3d.engine.pretraining.patch_targets` supervises it and the findings prompt reads it the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FindingDetector", "DEFAULT_DETECTOR", "detector_config"]

#: widths and strides of the default detector: 128x128x32 -> 16x16x8 cells of 8x8x4 voxels (about 1-2 mm in-plane
#: voxels, so cells of 8-15 mm); batch norm (per-channel statistics keep the absolute intensity that tells a cyst
#: from a mass, which instance norm would remove)
DEFAULT_DETECTOR: dict[str, Any] = {
    "channels": [16, 32, 48, 64],
    "strides": [[2, 2, 1], [2, 2, 2], [2, 2, 2], [1, 1, 1]],
    "kernel_size": 3,
    "norm": "batch",
}


def detector_config(config: Mapping[str, Any] | bool | None, in_channels: int, num_finding_types: int
                    ) -> dict[str, Any] | None:
    """A complete detector config: ``True`` / ``{}`` -> :data:`DEFAULT_DETECTOR`, a partial dict -> its overrides on
    top of it, ``None`` / ``False`` -> ``None``; ``in_channels`` and ``num_finding_types`` are filled in."""
    if config is None or config is False:
        return None
    out = {**DEFAULT_DETECTOR, **(dict(config) if isinstance(config, Mapping) else {})}
    out.update(in_channels=int(in_channels), num_finding_types=int(num_finding_types))
    if len(out["channels"]) != len(out["strides"]):
        raise ValueError(f"detector: {len(out['channels'])} channel widths but {len(out['strides'])} strides")
    return out


class FindingDetector(nn.Module):
    """``pixel_values (B, C, H, W, D)`` -> ``(logits (B, h*w*d, 1 + num_finding_types), grid (h, w, d))``.

    ``channels[i]`` / ``strides[i]``: one MONAI ``Convolution`` block (conv, norm, PReLU) per entry; a final 1x1x1
    convolution gives the cell logits. The grid is ``H / prod(strides_h)`` etc. (input sizes must divide).
    """

    def __init__(self, in_channels: int, num_finding_types: int, channels: Sequence[int] = (16, 32, 48, 64),
                 strides: Sequence[Sequence[int] | int] = ((2, 2, 1), (2, 2, 2), (2, 2, 2), 1),
                 kernel_size: int = 3, norm: str | None = "batch") -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        layers: list[nn.Module] = []
        width = int(in_channels)
        for out_width, stride in zip(channels, strides):
            stride = tuple(int(s) for s in stride) if isinstance(stride, Sequence) else int(stride)
            layers.append(Convolution(3, width, int(out_width), strides=stride, kernel_size=int(kernel_size),
                                      norm=norm.upper() if norm else None, act="PRELU"))
            width = int(out_width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv3d(width, 1 + int(num_finding_types), kernel_size=1)
        self.num_finding_types = int(num_finding_types)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FindingDetector:
        """Build from a :func:`detector_config` dict."""
        return cls(config["in_channels"], config["num_finding_types"], config["channels"], config["strides"],
                   config.get("kernel_size", 3), config.get("norm", "batch"))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        param = self.classifier.weight
        maps = self.classifier(self.features(pixel_values.to(device=param.device, dtype=param.dtype)))
        grid = tuple(int(g) for g in maps.shape[-3:])
        return maps.flatten(2).transpose(1, 2), grid  # (B, 1 + n_types, h, w, d) -> (B, h*w*d, 1 + n_types)
