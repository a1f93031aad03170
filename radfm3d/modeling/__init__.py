# Copyright (c) radfm3d contributors. Apache-2.0.
"""Model room: 3D ViT, perceiver resampler, ``RadFM3DConfig`` and ``RadFM3DForCausalLM``."""

from __future__ import annotations

from radfm3d.modeling.configuration import RadFM3DConfig, list_presets
from radfm3d.modeling.model import RadFM3DForCausalLM, RadFM3DPreTrainedModel
from radfm3d.modeling.resampler import PerceiverResampler, ResamplerConfig
from radfm3d.modeling.vision import VisionConfig, VisionTransformer3D, strided_position_index

__all__ = [
    "RadFM3DConfig",
    "RadFM3DForCausalLM",
    "RadFM3DPreTrainedModel",
    "PerceiverResampler",
    "ResamplerConfig",
    "VisionConfig",
    "VisionTransformer3D",
    "strided_position_index",
    "list_presets",
]


def _register_auto_classes() -> None:
    """Let ``AutoConfig``/``AutoModelForCausalLM`` resolve ``model_type="radfm3d"``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("radfm3d", RadFM3DConfig)
        AutoModelForCausalLM.register(RadFM3DConfig, RadFM3DForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()
