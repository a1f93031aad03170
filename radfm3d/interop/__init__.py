# Copyright (c) radfm3d contributors. Apache-2.0.
"""Interoperability with external checkpoints: the official RadFM weights (``radfm3d.interop.radfm``) and
quantisation (``radfm3d.interop.quantize``); imported lazily. Base-LLM loading lives in ``radfm3d.modeling.llm``."""
