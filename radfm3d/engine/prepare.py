# Copyright (c) radfm3d contributors. Apache-2.0.
"""``prepare_batch`` for MONAI engines: a collated VLM batch -> (input_ids, labels, args, kwargs).

The engines then call ``inferer(input_ids, network, **kwargs)`` and ``loss_function(pred, labels)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

__all__ = ["PrepareBatchVLM", "MODEL_INPUT_KEYS"]

#: batch keys passed to the model as keyword arguments (besides input_ids)
MODEL_INPUT_KEYS = ("attention_mask", "pixel_values", "image_mask")


class PrepareBatchVLM(PrepareBatch):
    """Move a collated batch to ``device`` and split it for the engine.

    Batch keys: ``input_ids`` (B, L) long, ``attention_mask`` (B, L), ``pixel_values`` (B, S, C, H, W, D) float,
    ``image_mask`` (B, S) bool, ``labels`` (B, L) long with -100 on ignored positions (training only).

    Args:
        blank_images: replace ``pixel_values`` by zeros (the blind baseline: same prompts, no image content).
        pixel_dtype: cast ``pixel_values`` to this dtype (e.g. ``torch.bfloat16``); default keeps float32.
    """

    def __init__(self, blank_images: bool = False, pixel_dtype: torch.dtype | None = None) -> None:
        self.blank_images = bool(blank_images)
        self.pixel_dtype = pixel_dtype

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, torch.Tensor]]:
        if "input_ids" not in batchdata:
            raise KeyError(f"the batch has no 'input_ids' (keys: {sorted(batchdata)})")

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, non_blocking=non_blocking, **kwargs) if device is not None else t

        input_ids = move(torch.as_tensor(batchdata["input_ids"]))
        model_kwargs: dict[str, torch.Tensor] = {}
        for key in MODEL_INPUT_KEYS:
            value = batchdata.get(key)
            if value is None:
                continue
            value = torch.as_tensor(value)
            if key == "pixel_values":
                if self.blank_images:
                    value = torch.zeros_like(value)
                if self.pixel_dtype is not None:
                    value = value.to(self.pixel_dtype)
            model_kwargs[key] = move(value)
        labels = batchdata.get("labels")
        labels = move(torch.as_tensor(labels)) if labels is not None else None
        return input_ids, labels, (), model_kwargs
