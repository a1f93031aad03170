# Copyright (c) radfm3d contributors. Apache-2.0.
"""Contrastive room: image-report pre-training of the 3D vision tower (scan, structure and study levels).

- :mod:`~radfm3d.contrastive.configuration`: ``RadFM3DCLIPConfig`` and the text-tower folder lookup.
- :mod:`~radfm3d.contrastive.model`: ``RadFM3DCLIPModel`` (transformers ``CLIPModel`` conventions).
- :mod:`~radfm3d.contrastive.loss`: text groups, multi-positive InfoNCE, the feature queue, the multi-level loss.
- :mod:`~radfm3d.contrastive.processing`: ``RadFM3DCLIPProcessor`` (tokenizer + preprocessing recipe).
- :mod:`~radfm3d.contrastive.transfer`: ``load_vision_tower`` (a trained tower between ``RadFM3DCLIPModel`` and
  ``RadFM3DForCausalLM``, either way).
"""

from __future__ import annotations

from radfm3d.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "RadFM3DCLIPConfig": "radfm3d.contrastive.configuration",
    "resolve_text_model": "radfm3d.contrastive.configuration",
    "LEVELS": "radfm3d.contrastive.configuration",
    "TINY_TEXT_CONFIG": "radfm3d.contrastive.configuration",
    "RadFM3DCLIPModel": "radfm3d.contrastive.model",
    "RadFM3DCLIPOutput": "radfm3d.contrastive.model",
    "ContrastiveLevels": "radfm3d.contrastive.model",
    "load_text_tower": "radfm3d.contrastive.model",
    "RadFM3DCLIPProcessor": "radfm3d.contrastive.processing",
    "group_ids": "radfm3d.contrastive.loss",
    "normalise_text": "radfm3d.contrastive.loss",
    "contrastive_loss": "radfm3d.contrastive.loss",
    "FeatureQueue": "radfm3d.contrastive.loss",
    "MultiLevelContrastiveLoss": "radfm3d.contrastive.loss",
    "gather_features": "radfm3d.contrastive.loss",
    "load_vision_tower": "radfm3d.contrastive.transfer",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("radfm3d.contrastive", _EXPORTS)
