# Copyright (c) radfm3d contributors. Apache-2.0.
"""Move a trained vision tower (3D ViT + resampler) between the contrastive and the generative model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from radfm3d.contrastive.configuration import is_clip_folder
from radfm3d.errors import RadFM3DInputError
from radfm3d.modeling.model import check_checkpoint_state
from radfm3d.utils import is_unset

__all__ = ["load_vision_tower", "build_model_with_vision_tower", "TOWER_PREFIXES"]

#: the state-dict prefixes shared by ``RadFM3DCLIPModel`` and ``RadFM3DForCausalLM``
TOWER_PREFIXES = ("vision_model.", "resampler.")

logger = logging.getLogger(__name__)

# config keys that change no weight shape or meaning (a tower trained with dropout fits a model without it)
_IGNORED_KEYS = {"dropout", "emb_dropout", "gradient_checkpointing"}


def _compare(section: str, source_config: dict[str, Any], target_config: dict[str, Any], source: str) -> None:
    for key in sorted(set(source_config) | set(target_config)):
        if key in _IGNORED_KEYS:
            continue
        a, b = source_config.get(key), target_config.get(key)
        if isinstance(a, (list, tuple)):
            a = list(a)
        if isinstance(b, (list, tuple)):
            b = list(b)
        if a != b:
            raise RadFM3DInputError(source, f"{section}.{key} differs: {a!r} in the source tower, {b!r} in the "
                                    f"target model's config")


def _read_tower(source: str | os.PathLike | Any) -> tuple[Any, dict[str, Any], str]:
    """A model instance or checkpoint folder -> (its config, its ``vision_model.*`` / ``resampler.*`` tensors, a name
    for errors). A folder's ``config.json`` says which kind it is (``model_type`` ``radfm3d_clip``: a CLIP model;
    otherwise a generative model, read as ``RadFM3DForCausalLM.from_pretrained`` reads it); only the tower's tensors
    are read from its safetensors file(s), nothing else is built."""
    from radfm3d.contrastive.model import WEIGHTS_NAME, RadFM3DCLIPModel
    from radfm3d.modeling.model import RadFM3DForCausalLM

    if hasattr(source, "vision_model") and hasattr(source, "resampler") and hasattr(source, "config"):
        state = {k: v for k, v in source.state_dict().items() if k.startswith(TOWER_PREFIXES)}
        return source.config, state, f"<{type(source).__name__}>"
    folder = Path(source)
    path = folder / "config.json"
    if not path.is_file():
        raise RadFM3DInputError(folder, "not a vision-tower checkpoint folder (no config.json; a RadFM3DCLIPModel or "
                                "RadFM3DForCausalLM folder is expected)")
    if is_clip_folder(folder):
        config = RadFM3DCLIPModel._read_config(folder)
        files = [folder / WEIGHTS_NAME]
        if not files[0].is_file():
            raise RadFM3DInputError(folder, f"no {WEIGHTS_NAME} in the checkpoint folder")
    else:
        config = RadFM3DForCausalLM._checkpoint_class(folder)._read_config(folder)
        files = RadFM3DForCausalLM._weight_files(folder)
    from safetensors import SafetensorError, safe_open

    state: dict[str, Any] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(TOWER_PREFIXES):
                        state[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise RadFM3DInputError(file, f"unreadable safetensors file ({err})") from None
    return config, state, str(folder)


def load_vision_tower(model: Any, source: str | os.PathLike | Any) -> Any:
    """Copy the vision tower (``vision_model.*``) and resampler (``resampler.*``) of ``source`` into ``model``, in
    place; returns ``model``.

    Both may be a :class:`~radfm3d.contrastive.model.RadFM3DCLIPModel` or a
    :class:`~radfm3d.modeling.model.RadFM3DForCausalLM` (the two share the modules and the weight keys); ``source``
    may also be a checkpoint folder of either. So a contrastive stage 0 initialises the generative model, and a
    supervised, instruction-tuned or converted official RadFM tower starts (or is probed as) a CLIP model.

    ``vision_config`` and ``resampler_config`` must agree key by key (dropout rates and gradient checkpointing
    excepted); a difference is a :class:`~radfm3d.errors.RadFM3DInputError` naming the key. The copied tensors are
    checked finite.
    """
    config, state, name = _read_tower(source)
    _compare("vision_config", config.vision_config, model.config.vision_config, name)
    _compare("resampler_config", config.resampler_config, model.config.resampler_config, name)
    check_checkpoint_state(name, state)
    for prefix, module in (("vision_model.", model.vision_model), ("resampler.", model.resampler)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            raise RadFM3DInputError(name, f"holds no {prefix}* weights (a checkpoint saved without its vision tower)")
        missing, unexpected = module.load_state_dict(part, strict=False)
        if missing or unexpected:
            raise RadFM3DInputError(name, f"{prefix[:-1]} weights do not match: missing {sorted(missing)[:10]}, "
                                    f"unexpected {sorted(unexpected)[:10]}")
    return model


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
