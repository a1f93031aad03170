# Copyright (c) radfm3d contributors. Apache-2.0.
"""MONAI inferers for the VLM: a teacher-forced forward (training) and greedy generation (evaluation, inference)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from radfm3d.engine.training import autocast_dtype, unwrap_model

__all__ = ["ForwardInferer", "GenerationInferer"]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class ForwardInferer(Inferer):
    """``network(input_ids, **kwargs)`` under bf16 autocast where supported (``precision="auto"``).

    Returns the model output (``logits`` (B, L, V)); the loss is computed by the engine's ``loss_function``.
    """

    def __init__(self, precision: str = "auto") -> None:
        super().__init__()
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _autocast(inputs.device, self.precision):
            return network(inputs, *args, **kwargs)


def _positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (a bundle override may arrive as the string "32"), else ``RadFM3DInputError``."""
    from radfm3d.errors import RadFM3DInputError

    try:
        number = int(str(value).strip()) if not isinstance(value, (bool, float)) else None
    except ValueError:
        number = None
    if number is None or number < 1:
        raise RadFM3DInputError(name, f"must be an integer >= 1, got {value!r}")
    return number


class GenerationInferer(Inferer):
    """Greedy ``generate`` on the (unwrapped) model; returns the decoded new text per sample (list of B str).

    Args:
        processor: decodes token ids (``batch_decode``); None returns the new token ids (B, T) instead.
        max_new_tokens: generation budget per prompt.
        precision: autocast precision ("auto" = bf16 on CUDA devices that support it).
        generate_kwargs: passed to ``generate`` (defaults: ``do_sample=False``).

    ``last_seconds`` holds the wall time of the last call (s).
    """

    def __init__(self, processor: Any = None, max_new_tokens: int = 64, precision: str = "auto",
                 **generate_kwargs: Any) -> None:
        super().__init__()
        self.processor = processor
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.precision = precision
        self.generate_kwargs = {"do_sample": False, **generate_kwargs}
        self.last_seconds = 0.0

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> list[str] | torch.Tensor:
        model = unwrap_model(network)
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        with torch.no_grad(), _autocast(inputs.device, self.precision):
            out = model.generate(input_ids=inputs, max_new_tokens=self.max_new_tokens, **kwargs,
                                 **self.generate_kwargs)
        if was_training:
            model.train()
        out = out.sequences if hasattr(out, "sequences") else out
        # transformers convention: prompt + new tokens; some models return the new tokens only
        new_tokens = out[:, inputs.shape[1]:] if out.shape[1] >= inputs.shape[1] and torch.equal(
            out[:, : inputs.shape[1]], inputs) else out
        self.last_seconds = time.perf_counter() - start
        if self.processor is None:
            return new_tokens
        return [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
