# Copyright (c) radfm3d contributors. Apache-2.0.
"""The training loss as a MONAI-engine callable: ``loss_function(pred, targets) -> scalar``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from radfm3d.modeling.model import causal_lm_loss

__all__ = ["CausalLMLoss", "logits_of"]

IGNORE_INDEX = -100


def logits_of(pred: Any) -> torch.Tensor:
    """The logits tensor (B, L, V) of a model output (transformers ``ModelOutput``, dict or tensor)."""
    if isinstance(pred, torch.Tensor):
        return pred
    logits = getattr(pred, "logits", None)
    if logits is None and isinstance(pred, Mapping):
        logits = pred.get("logits")
    if logits is None:
        raise TypeError(f"cannot find logits in a model output of type {type(pred).__name__}")
    return logits


class CausalLMLoss:
    """Next-token cross-entropy: logits (B, L, V) at position t predict ``labels`` (B, L) at t + 1.

    Positions labelled ``ignore_index`` (-100: prompt, image and pad tokens) and ids outside the vocabulary do not
    count. The loss is the mean over the counted tokens of the batch in float32 (also under bf16 autocast):
    :func:`radfm3d.modeling.model.causal_lm_loss`, the model's own loss.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = int(ignore_index)

    def __call__(self, pred: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = logits_of(pred)
        if labels is None:
            raise ValueError("CausalLMLoss needs labels (B, L); the batch has none")
        if logits.shape[:2] != labels.shape[:2]:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in (B, L)")
        return causal_lm_loss(logits, labels, ignore_index=self.ignore_index)
