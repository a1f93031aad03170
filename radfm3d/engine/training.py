# Copyright (c) radfm3d contributors. Apache-2.0.
"""Training-stage helpers: seeding, freeze switches, LoRA (peft), optimizer, warm-up + cosine LR, autocast.

Stages (RadFM-style):

- ``"alignment"``: the LLM is frozen; vision encoder, resampler, projector and the model's extra token rows train.
- ``"instruction"``: LoRA adapters are added to the LLM (peft) and train together with the visual parts.
- ``"full"``: everything trains.

Every switch is also available on its own (:func:`set_trainable`), so a config can mix them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_PARTS",
    "STAGES",
    "seed_everything",
    "unwrap_model",
    "set_trainable",
    "apply_lora",
    "has_lora",
    "configure_stage",
    "trainable_parameters",
    "count_parameters",
    "build_optimizer",
    "warmup_cosine_schedule",
    "autocast_dtype",
    "build_model",
    "save_trained_model",
    "load_trained_model",
    "load_processor",
    "parameters_digest",
]

logger = logging.getLogger(__name__)

#: switch name -> attribute of ``RadFM3DForCausalLM`` holding that part
MODEL_PARTS: dict[str, str] = {
    "vision": "vision_model",
    "resampler": "resampler",
    "projector": "projector",
    "embeddings": "extra_token_embeddings",
    "llm": "language_model",
}

#: stage name -> switches (``llm``: "frozen" | "lora" | "full")
STAGES: dict[str, dict[str, Any]] = {
    "alignment": {"vision": True, "resampler": True, "projector": True, "embeddings": True, "llm": "frozen"},
    "instruction": {"vision": True, "resampler": True, "projector": True, "embeddings": True, "llm": "lora"},
    "full": {"vision": True, "resampler": True, "projector": True, "embeddings": True, "llm": "full"},
}

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def seed_everything(seed: int | None = 0) -> None:
    """Seed python, numpy and torch (``monai.utils.set_determinism``; also makes cuDNN deterministic)."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers (or the model itself)."""
    while hasattr(model, "module") and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _part(model: nn.Module, name: str) -> nn.Module | nn.Parameter | None:
    attr = MODEL_PARTS.get(name, name)
    return getattr(unwrap_model(model), attr, None)


def _set_requires_grad(obj: nn.Module | nn.Parameter | None, flag: bool) -> None:
    if obj is None:
        return
    if isinstance(obj, nn.Parameter):
        obj.requires_grad_(flag)
    else:
        for p in obj.parameters():
            p.requires_grad_(flag)


def set_trainable(model: nn.Module, **parts: bool) -> nn.Module:
    """Freeze (False) or unfreeze (True) parts by switch name (see :data:`MODEL_PARTS`), in place.

    >>> set_trainable(model, vision=True, resampler=True, projector=True, llm=False)
    """
    for name, flag in parts.items():
        if name not in MODEL_PARTS:
            raise ValueError(f"unknown model part {name!r}; expected one of {sorted(MODEL_PARTS)}")
        _set_requires_grad(_part(model, name), bool(flag))
    return model


def has_lora(model: nn.Module) -> bool:
    """True when peft LoRA layers are injected in the model."""
    return any("lora_" in n for n, _ in unwrap_model(model).named_parameters())


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
) -> nn.Module:
    """Add LoRA adapters (peft, via ``RadFM3DForCausalLM.add_lora``) to the model's LLM, in place.

    The LLM's own weights are frozen and keep their values; only the adapters of the LLM train. The model's
    ``save_pretrained`` writes the adapter weights and ``adapter_config.json`` (the base LLM stays named).
    """
    from peft import LoraConfig

    inner = unwrap_model(model)
    llm = _part(model, "llm")
    if llm is None or not hasattr(inner, "add_lora"):
        raise ValueError("apply_lora: expected a RadFM3DForCausalLM (with a `language_model`)")
    if has_lora(model):
        logger.info("LoRA adapters already present; not adding them again")
    else:
        inner.add_lora(LoraConfig(r=int(r), lora_alpha=int(alpha), lora_dropout=float(dropout),
                                  target_modules=list(target_modules), bias="none"))
    for name, p in llm.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def configure_stage(
    model: nn.Module,
    stage: str = "alignment",
    *,
    vision: bool | None = None,
    resampler: bool | None = None,
    projector: bool | None = None,
    embeddings: bool | None = None,
    llm: str | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Set the model up for a training stage (see :data:`STAGES`) in place and return it.

    Explicit switches (``vision=False`` ...) override the stage's defaults; ``llm`` is "frozen", "lora" or "full".
    ``gradient_checkpointing`` turns on activation checkpointing where the model supports it (transformers API).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    switches = dict(STAGES[stage])
    for key, value in (("vision", vision), ("resampler", resampler), ("projector", projector),
                       ("embeddings", embeddings), ("llm", llm)):
        if value is not None:
            switches[key] = value
    llm_mode = str(switches.pop("llm"))
    if llm_mode not in ("frozen", "lora", "full"):
        raise ValueError(f"llm must be 'frozen', 'lora' or 'full', got {llm_mode!r}")
    set_trainable(model, **switches)
    if llm_mode == "lora" or has_lora(model):
        apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules)
        if llm_mode != "lora":
            _set_requires_grad(_part(model, "llm"), llm_mode == "full")
    else:
        _set_requires_grad(_part(model, "llm"), llm_mode == "full")
    if gradient_checkpointing:
        inner = unwrap_model(model)
        if hasattr(inner, "set_gradient_checkpointing"):
            inner.set_gradient_checkpointing(True)
        elif hasattr(inner, "gradient_checkpointing_enable"):
            try:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            except (ValueError, TypeError) as err:  # model without checkpointing support
                logger.warning(f"gradient checkpointing not enabled: {err}")
    n_train, n_total = count_parameters(model)
    logger.info(f"stage {stage!r}: {n_train:,} of {n_total:,} parameters train ({switches}, llm={llm_mode})")
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what the optimizer updates)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def build_optimizer(
    model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights (1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for p in trainable_parameters(model):
        (no_decay if p.ndim < 2 else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no trainable parameters (check the stage / freeze switches)")
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


class _WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total`` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = max(0, int(warmup)), max(1, int(total)), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: linear warm-up then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``.

    Extending a run (more epochs) re-stretches the cosine over the new ``total_steps``; the step count is kept.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


def autocast_dtype(device: str | torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype for ``precision`` ("auto", "bf16", "fp32") on ``device``; None = no autocast.

    "auto" picks bf16 on CUDA devices that support it, and fp32 (no autocast) on the CPU, where bf16 matmuls are
    slower on most processors; "bf16" forces it (CPU autocast supports bf16).
    """
    precision = str(precision).lower()
    if precision in ("fp32", "float32", "no", "none", "false"):
        return None
    dev = torch.device(device)
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------------------- model in/out
def build_model(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu", seed: int | None = 0,
    load_text_weights: bool = True,
) -> nn.Module:
    """A ``RadFM3DForCausalLM`` from a preset name ("tiny", "demo"), a preset JSON or a saved model folder, in train
    mode on ``device``.

    A saved folder (``config.json``) continues from its trained parts and LoRA adapter; a preset gives fresh visual
    parts (seeded by ``seed``, so two runs start from the same weights) on top of the named base LLM.
    ``load_text_weights=False``: random LLM weights instead of the named base (see ``from_pretrained``).
    """
    from radfm3d.modeling.model import RadFM3DForCausalLM

    if seed is not None:
        seed_everything(seed)
    model = RadFM3DForCausalLM.from_pretrained(str(name_or_path), load_text_weights=load_text_weights)
    model.train()
    return model.to(device)


def save_trained_model(model: nn.Module, out_dir: str | os.PathLike, processor: Any = None) -> Path:
    """Save a trained model for inference: ``model.save_pretrained`` (trained parts + LoRA adapter; a named base LLM
    is named, not copied) and the processor (tokenizer + ``preprocessing.json``) beside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrap_model(model).save_pretrained(out)
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(out)
    return out


def load_trained_model(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """``RadFM3DForCausalLM.from_pretrained(model_dir)`` (LoRA adapter included) on ``device``, in eval mode."""
    from radfm3d.modeling.model import RadFM3DForCausalLM

    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    model = RadFM3DForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.eval()
    return model.to(device)


def parameters_digest(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the (named) parameters; used to compare two runs."""
    inner = unwrap_model(model)
    keep = set(names) if names is not None else None
    return {n: p.detach().cpu().clone() for n, p in inner.named_parameters() if keep is None or n in keep}


def load_processor(name_or_path: str | os.PathLike, recipe: Any = None) -> Any:
    """The ``RadFM3DProcessor`` of a saved model folder or of a preset name ("tiny", "demo").

    ``recipe`` (a ``PreprocessingRecipe``, its dict, or a ``preprocessing.json`` file/folder, e.g. the one a phantom
    set is written with) replaces the preset's preprocessing; a path that does not exist is ignored (None).
    """
    from radfm3d.processing import RadFM3DProcessor
    from radfm3d.transforms import PreprocessingRecipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = PreprocessingRecipe.load(recipe) if Path(recipe).exists() else None
    elif isinstance(recipe, dict):
        recipe = PreprocessingRecipe.from_dict(recipe)
    # a saved model folder keeps its own tokenizer (no base LLM needed); a preset is built from its config
    return RadFM3DProcessor.from_pretrained(str(name_or_path), **({} if recipe is None else {"recipe": recipe}))
