# Copyright (c) radfm3d contributors. Apache-2.0.
"""Interoperability with external checkpoints and base LLMs (imported lazily: ``radfm3d.interop.llm``, ...)."""
