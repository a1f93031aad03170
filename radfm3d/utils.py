# Copyright (c) radfm3d contributors. Apache-2.0.
"""Small helpers shared by several rooms (no imaging or model logic here)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first use of ``name``.

    Keeps ``import radfm3d.<room>`` light: torch, monai and transformers load only when a name needs them.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def progress_bar(total: int, enabled: bool = True, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar (``update``/``close``); a silent one when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, **tqdm_kwargs)
