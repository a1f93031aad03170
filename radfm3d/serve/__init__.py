# Copyright (c) radfm3d contributors. Apache-2.0.
"""OpenAI-compatible HTTP serving of radfm3d models (``radfm3d serve``); needs fastapi, uvicorn, python-multipart.

:mod:`radfm3d.serve.engine` is the only module here that calls the model; :mod:`radfm3d.serve.files` keeps the
uploaded scans; :mod:`radfm3d.serve.app` is the FastAPI application and the command line.
"""

from __future__ import annotations
