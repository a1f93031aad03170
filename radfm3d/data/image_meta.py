# Copyright (c) radfm3d contributors. Apache-2.0.
"""Per-image facts a manifest record carries beside its image paths, applied when the image is read.

Two optional record keys, each a list aligned with ``images`` (``null`` where nothing applies):

- ``image_series``: the DICOM SeriesInstanceUID to read when the path is a folder holding several series
  (``radfm3d import dicom-export`` writes it for flat exports).
- ``image_meta``: corrections from a dataset's own metadata where the file header is wrong or lacks them
  (``radfm3d import ct-rate`` writes them):

  ================  =========================================================================================
  key               meaning
  ================  =========================================================================================
  ``spacing_mm``    ``[sx, sy, sz]``: voxel spacing of the file's axes in mm; the affine's columns are rescaled
                    to it (directions and origin kept)
  ``hu_rescale``    ``[a, b]``: values become ``a * value + b`` (HU from the values the header gives)
  ``stored_to_hu``  ``[slope, intercept]``: applied only when the values read are stored values (none below 0;
                    CT air is about -1000 HU, so a volume already in HU has negative values)
  ``array_axes``    for a bare ``.npy`` array (no header): its axis order in the letters ``C X Y Z`` (e.g.
                    ``"CZYX"`` for M3D's ``(1, D, H, W)`` arrays); read with a nominal 1 mm grid, RAS axes,
                    ``geometry_known`` False (``spacing_mm`` may give the spacing where it is known)
  ================  =========================================================================================

:func:`load_record_image` reads one image of a record with both applied; :func:`check_image_fields` validates them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from radfm3d.errors import RadFM3DInputError

__all__ = ["IMAGE_META_KEYS", "check_image_fields", "apply_image_meta", "load_record_image", "needs_record_loader",
           "record_images"]

IMAGE_META_KEYS = {"spacing_mm": 3, "hu_rescale": 2, "stored_to_hu": 2, "array_axes": 0}


def _numbers(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def check_image_fields(record: Mapping[str, Any]) -> list[str]:
    """Problems of a record's ``image_series`` / ``image_meta`` (empty list = valid or absent)."""
    problems: list[str] = []
    images = record.get("images")
    n = len(images) if isinstance(images, list) else 0
    series = record.get("image_series")
    if series is not None and (not isinstance(series, list) or len(series) != n
                               or not all(s is None or (isinstance(s, str) and s) for s in series)):
        problems.append(f"'image_series' must be a list of {n} series UID strings or nulls, got {series!r}")
    metas = record.get("image_meta")
    if metas is not None:
        if not isinstance(metas, list) or len(metas) != n:
            problems.append(f"'image_meta' must be a list of {n} objects or nulls, got {metas!r}")
        else:
            for i, meta in enumerate(metas):
                if meta is None:
                    continue
                if not isinstance(meta, Mapping):
                    problems.append(f"'image_meta'[{i}] must be an object or null, got {meta!r}")
                    continue
                for key, value in meta.items():
                    if key not in IMAGE_META_KEYS:
                        problems.append(f"'image_meta'[{i}] has unknown key {key!r} (known: {sorted(IMAGE_META_KEYS)})")
                    elif key == "array_axes":
                        if not (isinstance(value, str) and sorted(value) in (sorted("CXYZ"), sorted("XYZ"))):
                            problems.append(f"'image_meta'[{i}].array_axes must order the letters C, X, Y, Z (e.g. "
                                            f"'CZYX'), got {value!r}")
                    elif not _numbers(value, IMAGE_META_KEYS[key]):
                        problems.append(f"'image_meta'[{i}].{key} must be {IMAGE_META_KEYS[key]} finite numbers, "
                                        f"got {value!r}")
                    elif key == "spacing_mm" and min(value) <= 0:
                        problems.append(f"'image_meta'[{i}].spacing_mm must be positive, got {value!r}")
    return problems


def apply_image_meta(image: Any, meta: Mapping[str, Any] | None, source: str | os.PathLike | None = None) -> Any:
    """``image`` (a channel-first MetaTensor from :func:`radfm3d.io.load_image`) with ``meta`` applied in place."""
    import torch

    if not meta:
        return image
    problems = check_image_fields({"images": [source or "<image>"], "image_meta": [dict(meta)]})
    if problems:
        raise RadFM3DInputError(source, "; ".join(problems))
    applied: list[str] = []
    if "spacing_mm" in meta:
        affine = torch.as_tensor(image.affine, dtype=torch.float64).clone()
        norms = torch.linalg.norm(affine[:3, :3], dim=0).clamp_min(1e-12)
        affine[:3, :3] = affine[:3, :3] / norms * torch.as_tensor(meta["spacing_mm"], dtype=torch.float64)
        image.affine = affine
        image.meta["original_spacing"] = tuple(float(v) for v in meta["spacing_mm"])
        image.meta["original_affine"] = affine.numpy()
        applied.append("spacing_mm")
    rescale = meta.get("hu_rescale")
    stored = meta.get("stored_to_hu")
    if stored is not None and rescale is None and float(image.min()) >= 0:
        rescale = stored
        applied.append("stored_to_hu")
    elif rescale is not None:
        applied.append("hu_rescale")
    if rescale is not None:
        a, b = float(rescale[0]), float(rescale[1])
        image.mul_(a).add_(b)
        if not bool(torch.isfinite(image).all()):
            raise RadFM3DInputError(source, f"values are not finite after the rescale {a:g} * value + {b:g}")
    image.meta["image_meta_applied"] = applied
    return image


def needs_record_loader(record: Mapping[str, Any]) -> bool:
    """Whether a record's images need :func:`load_record_image` (a series choice or corrections)."""
    return any(record.get(key) for key in ("image_series", "image_meta"))


def load_record_image(record: Mapping[str, Any], index: int, path: str | os.PathLike, **load_kwargs: Any) -> Any:
    """Image ``index`` of ``record`` (already resolved to ``path``) read with its series choice and corrections."""
    from radfm3d.io import load_image

    series = (record.get("image_series") or [None] * (index + 1))[index]
    meta = (record.get("image_meta") or [None] * (index + 1))[index] or {}
    if meta.get("array_axes"):
        image = load_image(_read_array(Path(path), meta["array_axes"]), affine=np.eye(4), **load_kwargs)
        image.meta.update({"filename_or_obj": str(path), "source_format": "npy", "geometry_known": False})
    else:
        image = load_image(Path(path), series_uid=series, **load_kwargs)
    return apply_image_meta(image, {k: v for k, v in meta.items() if k != "array_axes"}, path)


def record_images(record: Mapping[str, Any], paths: list[Any] | None = None) -> list[Any]:
    """What a processor reads for a record: its image paths as they are, or, where the record carries
    ``image_series`` / ``image_meta``, each image already read with them (channel-first MetaTensors)."""
    paths = list(record.get("images") or []) if paths is None else list(paths)
    if not needs_record_loader(record):
        return paths
    return [load_record_image(record, i, p) for i, p in enumerate(paths)]


def _read_array(path: Path, axes: str) -> np.ndarray:
    """A bare ``.npy`` array (never a pickle) transposed from ``axes`` to ``(C, X, Y, Z)``."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RadFM3DInputError(path, "file does not exist") from None
    except (ValueError, OSError, EOFError) as err:
        raise RadFM3DInputError(path, f"not a readable .npy array ({err})") from None
    if array.ndim != len(axes):
        raise RadFM3DInputError(path, f"array has {array.ndim} axes but the record says {axes!r}")
    if "C" not in axes:
        array, axes = array[None], "C" + axes
    return np.ascontiguousarray(np.transpose(array, [axes.index(a) for a in "CXYZ"]), dtype=np.float32)
