# Copyright (c) radfm3d contributors. Apache-2.0.
"""Initialise the generative model's vision tower from a contrastive checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from radfm3d.errors import RadFM3DInputError
from radfm3d.modeling.model import check_checkpoint_state
from radfm3d.utils import is_unset

__all__ = ["load_vision_tower", "build_model_with_vision_tower", "TOWER_PREFIXES"]

#: the state-dict prefixes shared by ``RadFM3DCLIPModel`` and ``RadFM3DForCausalLM``
TOWER_PREFIXES = ("vision_model.", "resampler.")

logger = logging.getLogger(__name__)

# config keys that change no weight shape or meaning (a tower trained with dropout fits a model without it)
_IGNORED_KEYS = {"dropout", "emb_dropout", "gradient_checkpointing"}


def _compare(section: str, clip: dict[str, Any], target: dict[str, Any], source: str) -> None:
    for key in sorted(set(clip) | set(target)):
        if key in _IGNORED_KEYS:
            continue
        a, b = clip.get(key), target.get(key)
        if isinstance(a, (list, tuple)):
            a = list(a)
        if isinstance(b, (list, tuple)):
            b = list(b)
        if a != b:
            raise RadFM3DInputError(source, f"{section}.{key} differs: {a!r} in the CLIP tower, {b!r} in the "
                                    f"generative model's config")


def load_vision_tower(causal_lm: Any, clip: str | os.PathLike | Any) -> Any:
    """Copy ``vision_model.*`` and ``resampler.*`` of a :class:`~radfm3d.contrastive.model.RadFM3DCLIPModel`
    (an instance or a checkpoint folder) into ``causal_lm`` (a ``RadFM3DForCausalLM``, in place; returned).

    ``vision_config`` and ``resampler_config`` must agree key by key (dropout rates and gradient checkpointing
    excepted); a difference is a :class:`~radfm3d.errors.RadFM3DInputError` naming the key. A folder is read
    without building its text tower: only the tower's tensors are taken from ``model.safetensors`` (checked finite).
    """
    from radfm3d.contrastive.model import WEIGHTS_NAME, RadFM3DCLIPModel

    if isinstance(clip, RadFM3DCLIPModel):
        config, source = clip.config, "<RadFM3DCLIPModel>"
        state = {k: v for k, v in clip.state_dict().items() if k.startswith(TOWER_PREFIXES)}
    else:
        folder = Path(clip)
        if not (folder / "config.json").is_file():
            raise RadFM3DInputError(folder, "not a CLIP checkpoint folder (no config.json)")
        config, source = RadFM3DCLIPModel._read_config(folder), str(folder)
        path = folder / WEIGHTS_NAME
        if not path.is_file():
            raise RadFM3DInputError(folder, f"no {WEIGHTS_NAME} in the checkpoint folder")
        from safetensors import safe_open

        state = {}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(TOWER_PREFIXES):
                    state[key] = handle.get_tensor(key)
    _compare("vision_config", config.vision_config, causal_lm.config.vision_config, source)
    _compare("resampler_config", config.resampler_config, causal_lm.config.resampler_config, source)
    check_checkpoint_state(source, state)
    for prefix, module in (("vision_model.", causal_lm.vision_model), ("resampler.", causal_lm.resampler)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(part, strict=False)
        if missing or unexpected:
            raise RadFM3DInputError(source, f"{prefix[:-1]} weights do not match: missing {sorted(missing)[:10]}, "
                                    f"unexpected {sorted(unexpected)[:10]}")
    return causal_lm


def build_model_with_vision_tower(name_or_path: str | os.PathLike, seed: int | None = 0,
                                  vision_tower: str | os.PathLike | None = None, device: str = "cpu",
                                  load_text_weights: bool = True) -> Any:
    """:func:`radfm3d.engine.training.build_model`, then, with ``vision_tower`` (a CLIP checkpoint folder), its
    vision tower and resampler copied in by :func:`load_vision_tower`: the generative stages started from a
    contrastive stage 0 (the demo bundle's ``--vision_tower``)."""
    from radfm3d.engine.training import build_model

    model = build_model(name_or_path, device="cpu", seed=seed, load_text_weights=load_text_weights)
    if not is_unset(vision_tower):
        load_vision_tower(model, vision_tower)
        logger.info(f"vision tower and resampler initialised from {vision_tower}")
    return model.to(device)
