# Copyright (c) radfm3d contributors. Apache-2.0.
"""Slicer <-> radfm3d geometry with numpy only (no Qt, no VTK, no torch).

Slicer keeps a scalar volume as an array in ``(K, J, I)`` order (``slicer.util.arrayFromVolume``) with an
``IJKToRAS`` 4x4 matrix; radfm3d reads a scan as ``(X, Y, Z)`` = ``(I, J, K)`` voxels with a voxel -> RAS mm affine
(:func:`radfm3d.io.load_image`). Boxes come back from the model with their 8 corners in RAS mm and the grid's axes;
a Slicer ``vtkMRMLMarkupsROINode`` is a centre, a size along its own axes and an orientation, which is what
:func:`roi_parameters` gives.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["kji_to_model_array", "model_array_to_kji", "roi_parameters", "write_nrrd", "box_label", "guess_modality"]

_NRRD_TYPES = {np.dtype("int8"): "int8", np.dtype("uint8"): "uint8", np.dtype("int16"): "int16",
               np.dtype("uint16"): "uint16", np.dtype("int32"): "int32", np.dtype("uint32"): "uint32",
               np.dtype("float32"): "float", np.dtype("float64"): "double"}


def kji_to_model_array(array_kji: np.ndarray, ijk_to_ras: Any) -> tuple[np.ndarray, np.ndarray]:
    """A Slicer volume array ``(K, J, I)`` and its IJKToRAS matrix -> ``(array (I, J, K), affine 4x4 RAS mm)``,
    the voxel order and affine :func:`radfm3d.io.load_image` gives for the same scan read from a file."""
    array = np.asarray(array_kji)
    if array.ndim != 3:
        raise ValueError(f"a scalar volume array is (K, J, I), got shape {array.shape}")
    affine = np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("IJKToRAS matrix is singular or not finite")
    return np.ascontiguousarray(array.transpose(2, 1, 0)), affine


def guess_modality(array: np.ndarray) -> str | None:
    """``"CT"`` when the values span air in Hounsfield units (<= -900) to tissue (>= 100), else ``None``: the rule
    :func:`radfm3d.io.load_image` applies to untagged NIfTI/NRRD/MHA files, applied to a Slicer array so that a
    volume node is preprocessed like its file (``tests/slicer/test_nodes.py`` checks the two agree)."""
    values = np.asarray(array)
    if values.size == 0:
        return None
    return "CT" if float(values.min()) <= -900.0 and float(values.max()) >= 100.0 else None


def model_array_to_kji(array_ijk: np.ndarray) -> np.ndarray:
    """``(I, J, K)`` -> Slicer's ``(K, J, I)``."""
    return np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0))


def roi_parameters(box: Mapping[str, Any]) -> dict[str, Any]:
    """A radfm3d box (``corners_world_mm`` (8, 3) and ``axes_world`` (3x3, columns), as the server and the local
    runner return) -> ``{"center": (3,), "size": (3,), "orientation": 3x3 columns}`` in RAS mm: the exact box,
    oblique or not (size measured along each axis through the corners)."""
    corners = np.asarray(box["corners_world_mm"], dtype=np.float64).reshape(8, 3)
    axes = np.asarray(box.get("axes_world", np.eye(3)), dtype=np.float64).reshape(3, 3)
    axes = axes / np.linalg.norm(axes, axis=0, keepdims=True)
    if np.linalg.det(axes) < 0:  # a right-handed frame for Slicer; the box itself is unchanged
        axes[:, 2] *= -1
    centre = corners.mean(axis=0)
    local = (corners - centre) @ axes
    size = local.max(axis=0) - local.min(axis=0)
    return {"center": centre.tolist(), "size": size.tolist(), "orientation": axes.tolist()}


def box_label(text: str, index: int, default: str = "finding") -> str:
    """A short name for the ``index``-th ``<box>`` of ``text``: the words just before it (after the previous box or
    sentence end), e.g. ``"Locate: liver <box>..</box>"`` -> ``"liver"``."""
    spans = [m.span() for m in re.finditer(r"<box>.*?</box>", text)]
    if index >= len(spans):
        return f"{default} {index + 1}"
    start = spans[index - 1][1] if index > 0 else 0
    before = text[start:spans[index][0]]
    before = re.split(r"[.;:\n]", before)[-1]
    words = re.sub(r"[^A-Za-z0-9 \-]", " ", before).split()
    drop = {"at", "in", "is", "the", "a", "an", "and", "here", "of", "on", "located", "found", "seen"}
    while words and words[-1].lower() in drop:
        words.pop()
    words = words[-4:]
    while words and words[0].lower() in drop | {"with", "also", "there"}:
        words.pop(0)
    name = " ".join(words)
    return name or f"{default} {index + 1}"


def write_nrrd(path: str | os.PathLike, array_kji: np.ndarray, ijk_to_ras: Any, compress: bool = True) -> Path:
    """Write a Slicer volume (``(K, J, I)`` array + IJKToRAS) as a single-file NRRD in RAS space, the way Slicer
    saves it, with numpy and gzip only (Remote mode uploads it without needing torch or an image library).

    Written by hand rather than with pynrrd because Slicer's Python does not ship pynrrd and the header is six lines.
    """
    array = np.asarray(array_kji)
    if array.ndim != 3:
        raise ValueError(f"a scalar volume array is (K, J, I), got shape {array.shape}")
    dtype = array.dtype.newbyteorder("=") if array.dtype.byteorder not in ("=", "|") else array.dtype
    if dtype not in _NRRD_TYPES:
        array, dtype = array.astype(np.float32), np.dtype("float32")
    affine = np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)
    directions = " ".join("(" + ",".join(f"{v:.17g}" for v in affine[:3, c]) + ")" for c in range(3))
    k, j, i = array.shape
    header = ("NRRD0004\n"
              f"type: {_NRRD_TYPES[dtype]}\ndimension: 3\nspace: right-anterior-superior\nsizes: {i} {j} {k}\n"
              f"space directions: {directions}\nkinds: domain domain domain\nendian: little\n"
              f"encoding: {'gzip' if compress else 'raw'}\n"
              f"space origin: ({','.join(f'{v:.17g}' for v in affine[:3, 3])})\n\n")
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()  # C order of (K,J,I): I fastest
    from radfm3d.utils import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(gzip.compress(data, compresslevel=1) if compress else data)

    atomic_write(path, write)
    return Path(path)


def boxes_summary(boxes: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per box: centre and size in RAS mm (for the answer panel)."""
    lines = []
    for k, box in enumerate(boxes):
        c, s = box.get("centre_world_mm", [0, 0, 0]), box.get("size_mm", [0, 0, 0])
        lines.append(f"box {k + 1}: centre R {c[0]:.1f} A {c[1]:.1f} S {c[2]:.1f} mm, size "
                     f"{s[0]:.1f} x {s[1]:.1f} x {s[2]:.1f} mm")
    return lines
