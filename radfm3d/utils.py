# Copyright (c) radfm3d contributors. Apache-2.0.
"""Small helpers shared by several rooms (no imaging or model logic here)."""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
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


_TRUE, _FALSE, _NONE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"none", "null", ""}


def as_bool(value: Any, name: str = "flag") -> bool | None:
    """A command-line switch as a bool (None stays None).

    Why: ``python -m monai.bundle run --resume false`` hands the config the *string* "false" (python-fire only
    parses ``False``), which is truthy; bundle configs pass every switch through this instead.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in _NONE:
        return None
    raise ValueError(f"{name}: expected true/false, got {value!r}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` to a temporary sibling of ``path``, then ``os.replace`` it into place (never a half-written
    file under ``path``); the file gets the usual umask permissions (``mkstemp`` alone makes it 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
