# Copyright (c) radfm3d contributors. Apache-2.0.
"""Model presets shipped as package data (``tiny``, ``demo``, ``radfm-13b``): one ``RadFM3DConfig`` JSON each,
loaded by name with ``RadFM3DConfig.from_preset(name)`` / ``RadFM3DForCausalLM.from_pretrained(name)`` and listed
by ``radfm3d.modeling.list_presets()``. This folder holds data only; nothing here imports any other room."""
