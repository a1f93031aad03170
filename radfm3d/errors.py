# Copyright (c) radfm3d contributors. Apache-2.0.
"""Exceptions raised by radfm3d.

`RadFM3DInputError` is what every reader and validator raises for bad input; its message always names
the offending file (or "<array>") and the problem, so users can act on it without a traceback.
"""

from __future__ import annotations

import os

__all__ = ["RadFM3DError", "RadFM3DInputError"]


class RadFM3DError(Exception):
    """Base class of all radfm3d errors."""


class RadFM3DInputError(RadFM3DError, ValueError):
    """Bad user input (file, folder or array): ``str(err) == "<source>: <problem>"``.

    Args:
        source: the file/folder path, or a short description such as ``"<array>"``; ``None`` if unknown.
        problem: what is wrong, phrased so the user knows what to do.
    """

    def __init__(self, source: str | os.PathLike | object | None, problem: str) -> None:
        self.source = None if source is None else (
            os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(source))
        self.problem = str(problem)
        super().__init__(f"{self.source}: {self.problem}" if self.source is not None else self.problem)

    def __reduce__(self):  # keeps the error picklable across DataLoader worker processes
        return (type(self), (self.source, self.problem))
