# Copyright (c) radfm3d contributors. Apache-2.0.
"""Preprocessing: scan (any orientation/spacing) -> model grid ``(num_channels, H, W, D)`` in [0, 1].

The whole recipe is one serialisable :class:`PreprocessingRecipe` (saved beside a model as
``preprocessing.json``). Every output records a :class:`GridGeometry` (``meta["grid_geometry"]``), so a
point or box in model-grid coordinates maps back to voxel indices of the original file and to world
millimetres (RAS).

Design (why one interpolation): orientation to the recipe's axcodes, resampling to a spacing and fitting
the field of view onto the grid (stretch / letterbox / crop-or-pad) are all affine maps. Composing them
gives ONE map ``grid index -> world RAS mm -> original voxel index`` (``GridGeometry.grid_to_voxel_affine``),
so we interpolate ONCE, and only at the output points (128x128x32 = 0.5 M points instead of resampling a
78 M-voxel CT two or three times as a naive Orientation -> Spacing -> Resize chain does). The original
array is never reoriented or copied. When the grid is much coarser than the file (a 512x512x300 CT onto
128x128x32 moves ~4x4x9 voxels per grid step), plain trilinear sampling would alias thin structures
(vessels, fissures, cortical bone) into noise, so we first average-pool the original with integer
kernels ``floor(step)`` per voxel axis (a box pre-filter, area-style; ``torch.avg_pool3d``, ~0.1 s for
512x512x300), smooth the pooled volume with [1, 6, 1]/8 (box + this ~ a triangle of support 2 steps, the
usual antialias kernel for linear downsampling) and then sample the pooled volume trilinearly with
``torch.nn.functional.grid_sample`` (``align_corners=True`` on voxel centres). The pooled volume is ~1/150
of the original, so the sampler hardly matters; ``benchmarks/bench_preprocessing.py`` times it against
``scipy.ndimage.map_coordinates`` (``sampler="scipy"``) and the torch one is the default.

Conventions:
- grid axes are world-aligned and follow ``recipe.axcodes`` ("RAS": grid axis 0 runs towards +R(ight),
  1 towards +A, 2 towards +S); 2D images keep the file's in-plane axes (see :func:`compute_grid_geometry`).
- the field of view (FOV) is the world bounding box of the voxel *extents* ``[-0.5, n-0.5]`` of the
  original volume; grid voxel ``i`` covers ``[i-0.5, i+0.5]`` (so 512 voxels of 0.7 mm -> 128 x 2.8 mm).
- samples outside the original extent get the background (-1024 HU for CT, 0 otherwise).
- boxes are ``(lo0, lo1, lo2, hi0, hi1, hi2)`` in continuous index coordinates (voxel centres at integers)
  or world mm; mapped boxes are the bounding box of the 8 mapped corners (exact for axis-aligned maps).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Transform
from monai.utils import TransformBackends

from radfm3d.errors import RadFM3DInputError

__all__ = [
    "RECIPE_FILENAME",
    "PreprocessingRecipe",
    "GridGeometry",
    "compute_grid_geometry",
    "preprocess",
    "ResampleToGrid",
    "ResampleToGridd",
    "ModalityIntensity",
    "ModalityIntensityd",
    "LoadScan",
    "LoadScand",
    "preprocessing_transforms",
]

RECIPE_FILENAME = "preprocessing.json"
_RECIPE_FORMAT = "radfm3d-preprocessing"
_RECIPE_VERSION = 1
_FITS = ("stretch", "letterbox", "crop_or_pad")
_INTERPOLATIONS = ("trilinear", "nearest")
_INTENSITIES = ("auto", "minmax", "percentile")
_BACKENDS = ("torch", "scipy")
CT_BACKGROUND_HU = -1024.0
# axcode letter -> (world RAS axis, direction)
_AXCODE = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# --------------------------------------------------------------------------------------------- recipe
@dataclass
class PreprocessingRecipe:
    """Everything that turns a scan into model input; saved beside the model as ``preprocessing.json``.

    Attributes:
        spatial_size: model grid (H, W, D) in ``axcodes`` voxel order. With ``depth_multiple`` set, D is
            the maximum depth and the actual depth adapts to the scan (RadFM convention).
        axcodes: orientation of the grid axes ("RAS": axis 0 towards Right, 1 Anterior, 2 Superior).
        target_spacing: grid spacing in mm per grid axis; only for ``fit="crop_or_pad"``.
        fit: "stretch" (whole FOV -> grid, anisotropic), "letterbox" (whole FOV, one in-plane mm spacing
            for axes 0 and 1, padded with background; depth stretched), "crop_or_pad" (fixed spacing, grid
            centred on the FOV centre).
        ct_windows: (level, width) HU windows; one output channel each (one window is replicated).
        mr_percentiles: (low, high) percentiles mapped to 0 and 1 for MR and other modalities.
        num_channels: channels of every output, whatever the modality.
        interpolation: "trilinear" (with box pre-filter when downsampling, see ``antialias``) or "nearest".
        intensity: "auto" (CT windows, MR/other percentiles), "minmax" (RadFM: min-max to [0, 1], channels
            identical), "percentile" (percentiles for every modality).
        antialias: average-pool the original before sampling when the grid is >= 2x coarser.
        depth_multiple: if set, depth = number of slices along the grid depth axis snapped to the nearest
            multiple of it, within [depth_multiple, spatial_size[2]] (RadFM: 4, up to 64).
        spatial_size_2d: grid for 2D images (H, W, D; the slice is replicated D times); None = spatial_size.
        background: value outside the scan before intensity scaling; None = -1024 for CT, 0 otherwise.
    """

    spatial_size: tuple[int, int, int] = (128, 128, 32)
    axcodes: str = "RAS"
    target_spacing: tuple[float, float, float] | None = None
    fit: str = "stretch"
    ct_windows: list[tuple[float, float]] = field(default_factory=lambda: [(40.0, 400.0), (-600.0, 1500.0),
                                                                            (400.0, 1800.0)])
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    num_channels: int = 3
    interpolation: str = "trilinear"
    intensity: str = "auto"
    antialias: bool = True
    depth_multiple: int | None = None
    spatial_size_2d: tuple[int, int, int] | None = None
    background: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def radfm(cls, in_plane: int = 256) -> PreprocessingRecipe:
        """The RadFM convention (arXiv 2308.02463): 3 identical channels, min-max to [0, 1] (no HU windows),
        2D images as 512x512x4, 3D as ``in_plane`` x ``in_plane`` x depth, depth snapped to a multiple of 4
        (4..64). Unlike RadFM's geometry-blind resize, orientation (RAS) is still honoured."""
        return cls(spatial_size=(in_plane, in_plane, 64), axcodes="RAS", fit="stretch", intensity="minmax",
                   ct_windows=[(40.0, 400.0)], num_channels=3, depth_multiple=4, spatial_size_2d=(512, 512, 4))

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "PreprocessingRecipe") -> None:
        """Normalise types and raise ``RadFM3DInputError`` naming the bad field."""

        def bad(problem: str) -> Exception:
            return RadFM3DInputError(source, problem)

        def int_triple(name: str, value: Any) -> tuple[int, int, int]:
            try:
                triple = tuple(int(v) for v in value)
                ok = len(triple) == 3 and all(float(v) == int(v) for v in value)
            except (TypeError, ValueError):
                ok = False
            if not ok or min(triple) < 1:
                raise bad(f"{name} must be three positive integers (H, W, D), got {value!r}")
            return triple  # type: ignore[return-value]

        self.spatial_size = int_triple("spatial_size", self.spatial_size)
        if self.spatial_size_2d is not None:
            self.spatial_size_2d = int_triple("spatial_size_2d", self.spatial_size_2d)
        codes = str(self.axcodes).upper()
        if len(codes) != 3 or any(c not in _AXCODE for c in codes) or len({_AXCODE[c][0] for c in codes}) != 3:
            raise bad(f"axcodes must name each of the axes R/L, A/P, S/I once (e.g. 'RAS', 'LPS'), "
                      f"got {self.axcodes!r}")
        self.axcodes = codes
        if self.fit not in _FITS:
            raise bad(f"fit must be one of {_FITS}, got {self.fit!r}")
        if self.target_spacing is not None:
            try:
                spacing = tuple(float(s) for s in self.target_spacing)
            except (TypeError, ValueError):
                spacing = ()
            if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise bad(f"target_spacing must be three positive mm values, got {self.target_spacing!r}")
            self.target_spacing = spacing  # type: ignore[assignment]
        if self.fit == "crop_or_pad" and self.target_spacing is None:
            raise bad("fit='crop_or_pad' needs target_spacing (mm per grid axis)")
        if self.fit != "crop_or_pad" and self.target_spacing is not None:
            raise bad(f"target_spacing only applies to fit='crop_or_pad'; fit={self.fit!r} derives the spacing "
                      "from the field of view (set target_spacing=None)")
        try:
            windows = [(float(lv), float(wd)) for lv, wd in self.ct_windows]
        except (TypeError, ValueError):
            raise bad(f"ct_windows must be a list of (level, width) HU pairs, got {self.ct_windows!r}") from None
        if not windows or any(not (math.isfinite(lv) and math.isfinite(wd) and wd > 0) for lv, wd in windows):
            raise bad(f"ct_windows needs at least one (level, width) pair with width > 0, got {self.ct_windows!r}")
        self.ct_windows = windows
        if not isinstance(self.num_channels, (int, np.integer)) or self.num_channels < 1:
            raise bad(f"num_channels must be a positive integer, got {self.num_channels!r}")
        self.num_channels = int(self.num_channels)
        if self.intensity == "auto" and len(windows) not in (1, self.num_channels):
            raise bad(f"{len(windows)} CT windows cannot fill num_channels={self.num_channels} "
                      "(give one window or one per channel)")
        try:
            lo, hi = (float(p) for p in self.mr_percentiles)
        except (TypeError, ValueError):
            raise bad(f"mr_percentiles must be (low, high), got {self.mr_percentiles!r}") from None
        if not 0.0 <= lo < hi <= 100.0:
            raise bad(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles!r}")
        self.mr_percentiles = (lo, hi)
        if self.interpolation not in _INTERPOLATIONS:
            raise bad(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if self.intensity not in _INTENSITIES:
            raise bad(f"intensity must be one of {_INTENSITIES}, got {self.intensity!r}")
        self.antialias = bool(self.antialias)
        if self.depth_multiple is not None:
            if int(self.depth_multiple) < 1 or int(self.depth_multiple) > self.spatial_size[2]:
                raise bad(f"depth_multiple must be in [1, spatial_size[2]={self.spatial_size[2]}], "
                          f"got {self.depth_multiple!r}")
            self.depth_multiple = int(self.depth_multiple)
        if self.background is not None:
            self.background = float(self.background)
            if not math.isfinite(self.background):
                raise bad(f"background must be finite, got {self.background!r}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists) with a format tag and version."""
        out: dict[str, Any] = {"format": _RECIPE_FORMAT, "version": _RECIPE_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif f.name == "ct_windows":
                value = [list(w) for w in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "PreprocessingRecipe") -> PreprocessingRecipe:
        """Inverse of :meth:`to_dict`; unknown keys or a newer version are errors naming ``source``."""
        if not isinstance(data, Mapping):
            raise RadFM3DInputError(source, f"a preprocessing recipe must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", _RECIPE_FORMAT)
        version = data.pop("version", _RECIPE_VERSION)
        if fmt != _RECIPE_FORMAT:
            raise RadFM3DInputError(source, f"not a radfm3d preprocessing recipe (format={fmt!r})")
        if not isinstance(version, int) or version > _RECIPE_VERSION:
            raise RadFM3DInputError(source, f"recipe version {version!r} is newer than this radfm3d "
                                       f"(supports <= {_RECIPE_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RadFM3DInputError(source, f"unknown recipe field(s) {unknown}; known: {sorted(known)}")
        for key in ("spatial_size", "spatial_size_2d", "target_spacing", "mr_percentiles"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        if isinstance(data.get("ct_windows"), list):
            data["ct_windows"] = [tuple(w) if isinstance(w, (list, tuple)) else w for w in data["ct_windows"]]
        recipe = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            setattr(recipe, f.name, value)
        recipe.validate(source)
        return recipe

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str, source: str = "PreprocessingRecipe") -> PreprocessingRecipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RadFM3DInputError(source, f"invalid JSON in preprocessing recipe ({err})") from None
        return cls.from_dict(data, source=source)

    @staticmethod
    def _recipe_path(path: str | os.PathLike) -> Path:
        p = Path(path)
        return p / RECIPE_FILENAME if (p.is_dir() or p.suffix.lower() != ".json") else p

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``preprocessing.json`` into folder ``path`` (created if needed) or to the .json file ``path``."""
        target = self._recipe_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.to_json() + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> PreprocessingRecipe:
        """Read a recipe from a folder holding ``preprocessing.json`` or from a .json file."""
        target = cls._recipe_path(path)
        if not target.is_file():
            raise RadFM3DInputError(str(target), "preprocessing recipe file not found")
        return cls.from_json(target.read_text(encoding="utf-8"), source=str(target))


# --------------------------------------------------------------------------------------------- geometry
def _as_points(points: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    arr = np.asarray(points, dtype=np.float64)
    if arr.shape[-1:] != (3,):
        raise ValueError(f"points must have shape (..., 3), got {arr.shape}")
    return arr.reshape(-1, 3), arr.shape


def _apply(matrix: np.ndarray, points: Any) -> np.ndarray:
    flat, shape = _as_points(points)
    return (flat @ matrix[:3, :3].T + matrix[:3, 3]).reshape(shape)


def _map_box(matrix: np.ndarray, box: Sequence[float]) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (6,):
        raise ValueError(f"a box is (lo0, lo1, lo2, hi0, hi1, hi2), got {np.asarray(box).shape}")
    corners = np.array(list(itertools.product(*[(b[a], b[a + 3]) for a in range(3)])))
    mapped = _apply(matrix, corners)
    return np.concatenate([mapped.min(axis=0), mapped.max(axis=0)])


class GridGeometry:
    """Where the model grid sits in the world and in the original file.

    ``grid_affine`` (4x4): grid index -> world RAS mm. ``original_affine`` (4x4): original voxel index ->
    world RAS mm. ``original_shape``: spatial shape (3 ints) of the original; ``spatial_size``: grid shape.
    Points are ``(..., 3)`` arrays; boxes ``(lo0, lo1, lo2, hi0, hi1, hi2)`` (see module docstring).
    """

    def __init__(self, grid_affine: Any, original_affine: Any, original_shape: Sequence[int],
                 spatial_size: Sequence[int], *, axcodes: str = "RAS", fit: str = "stretch",
                 is_2d: bool = False) -> None:
        self.grid_affine = np.asarray(grid_affine, dtype=np.float64).reshape(4, 4)
        self.original_affine = np.asarray(original_affine, dtype=np.float64).reshape(4, 4)
        self.original_shape = tuple(int(s) for s in original_shape)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.axcodes = axcodes
        self.fit = fit
        self.is_2d = bool(is_2d)

    @property
    def grid_to_voxel_affine(self) -> np.ndarray:
        """4x4 grid index -> original voxel index (the one map used for interpolation)."""
        return np.linalg.solve(self.original_affine, self.grid_affine)

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        """mm per grid step along each grid axis."""
        return tuple(float(v) for v in np.linalg.norm(self.grid_affine[:3, :3], axis=0))  # type: ignore[return-value]

    # points
    def grid_to_world(self, points_ijk: Any) -> np.ndarray:
        return _apply(self.grid_affine, points_ijk)

    def world_to_grid(self, points_xyz: Any) -> np.ndarray:
        return _apply(np.linalg.inv(self.grid_affine), points_xyz)

    def grid_to_voxel(self, points_ijk: Any) -> np.ndarray:
        return _apply(self.grid_to_voxel_affine, points_ijk)

    def voxel_to_grid(self, points_ijk: Any) -> np.ndarray:
        return _apply(np.linalg.inv(self.grid_to_voxel_affine), points_ijk)

    def voxel_to_world(self, points_ijk: Any) -> np.ndarray:
        return _apply(self.original_affine, points_ijk)

    def world_to_voxel(self, points_xyz: Any) -> np.ndarray:
        return _apply(np.linalg.inv(self.original_affine), points_xyz)

    # boxes
    def box_grid_to_world(self, box6: Sequence[float]) -> np.ndarray:
        return _map_box(self.grid_affine, box6)

    def box_world_to_grid(self, box6: Sequence[float]) -> np.ndarray:
        return _map_box(np.linalg.inv(self.grid_affine), box6)

    def box_grid_to_voxel(self, box6: Sequence[float]) -> np.ndarray:
        return _map_box(self.grid_to_voxel_affine, box6)

    def box_voxel_to_grid(self, box6: Sequence[float]) -> np.ndarray:
        return _map_box(np.linalg.inv(self.grid_to_voxel_affine), box6)

    def box_voxel_to_world(self, box6: Sequence[float]) -> np.ndarray:
        return _map_box(self.original_affine, box6)

    def box_world_to_voxel(self, box6: Sequence[float]) -> np.ndarray:
        return _map_box(np.linalg.inv(self.original_affine), box6)

    def voxel_box_to_slices(self, box6: Sequence[float]) -> tuple[slice, slice, slice]:
        """Slices of the original array holding the voxels whose centres lie in the voxel-space box."""
        b = np.asarray(box6, dtype=np.float64)
        return tuple(slice(int(max(0, math.ceil(b[a] - 1e-6))), int(min(n, math.floor(b[a + 3] + 1e-6) + 1)))
                     for a, n in enumerate(self.original_shape))  # type: ignore[return-value]

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"grid_affine": self.grid_affine.tolist(), "original_affine": self.original_affine.tolist(),
                "original_shape": list(self.original_shape), "spatial_size": list(self.spatial_size),
                "axcodes": self.axcodes, "fit": self.fit, "is_2d": self.is_2d, "space": "RAS"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> GridGeometry:
        """Inverse of :meth:`to_dict` (also accepts its JSON string)."""
        if isinstance(data, str):
            data = json.loads(data)
        return cls(np.asarray(data["grid_affine"]), np.asarray(data["original_affine"]), data["original_shape"],
                   data["spatial_size"], axcodes=data.get("axcodes", "RAS"), fit=data.get("fit", "stretch"),
                   is_2d=data.get("is_2d", False))

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.grid_spacing)
        return (f"GridGeometry(spatial_size={self.spatial_size}, spacing_mm=({sp}), axcodes={self.axcodes!r}, "
                f"fit={self.fit!r}, original_shape={self.original_shape}, is_2d={self.is_2d})")


def _snap_depth(n_slices: float, multiple: int, maximum: int) -> int:
    snapped = int(round(n_slices / multiple)) * multiple
    return int(min(max(snapped, multiple), (maximum // multiple) * multiple))


def _is_2d(shape: Sequence[int], meta: Mapping[str, Any] | None) -> bool:
    flag = (meta or {}).get("is_2d")
    if isinstance(flag, (bool, np.bool_)) or (isinstance(flag, torch.Tensor) and flag.numel() == 1):
        if bool(flag):
            return True
    return sum(int(s) == 1 for s in shape) == 1


def grid_geometry_of(image: Any, recipe: PreprocessingRecipe) -> GridGeometry:
    """Where the model grid of ``recipe`` sits for a channel-first image (its affine, shape and 2D flag); no
    resampling. :class:`ResampleToGrid` samples exactly this grid."""
    shape = tuple(int(s) for s in image.shape[1:])
    return compute_grid_geometry(_affine_of(image), shape, recipe, is_2d=_is_2d(shape, _meta_of(image)))


def _grid_steps_mm(extent_mm: np.ndarray, size: np.ndarray, recipe: PreprocessingRecipe) -> np.ndarray:
    """Grid step (mm) per grid axis for a field of view ``extent_mm`` on a grid of ``size`` voxels, by ``recipe.fit``:
    stretch (whole FOV on the grid), letterbox (one in-plane step, depth stretched), crop_or_pad (target spacing)."""
    if recipe.fit == "stretch":
        return extent_mm / size
    if recipe.fit == "letterbox":
        common = max(extent_mm[0] / size[0], extent_mm[1] / size[1])
        return np.array([common, common, extent_mm[2] / size[2]])
    return np.array(recipe.target_spacing, dtype=np.float64)


def compute_grid_geometry(affine: Any, shape: Sequence[int], recipe: PreprocessingRecipe,
                          is_2d: bool = False) -> GridGeometry:
    """Place the model grid for an image of spatial ``shape`` with voxel->world RAS ``affine``.

    3D: world-aligned grid following ``recipe.axcodes``, fitted to the world bounding box of the voxel
    extents (``fit``). 2D (one singleton axis): the grid's axes 0 and 1 follow the file's two in-plane axes
    in stored order (no reorientation of a radiograph), and the grid depth spans the single slice's extent,
    so every depth index samples the same slice (RadFM's replication) while staying invertible.
    """
    a = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    n = np.asarray([int(s) for s in shape], dtype=np.float64)
    if n.shape != (3,) or n.min() < 1:
        raise ValueError(f"spatial shape must be 3 positive ints, got {tuple(shape)}")
    vox_spacing = np.linalg.norm(a[:3, :3], axis=0)
    if is_2d:
        size = np.asarray(recipe.spatial_size_2d or recipe.spatial_size, dtype=np.float64)
        singleton = [ax for ax in range(3) if n[ax] == 1]
        depth_ax = singleton[-1] if singleton else 2
        plane = [ax for ax in range(3) if ax != depth_ax]
        order = plane + [depth_ax]  # grid axis k <- voxel axis order[k]
        ext_mm = n[order] * vox_spacing[order]
        step_mm = _grid_steps_mm(ext_mm, size, recipe)
        if recipe.fit == "crop_or_pad":
            step_mm[2] = ext_mm[2] / size[2]  # the single slice always spans the grid depth
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        for k, ax in enumerate(order):
            step = step_mm[k] / vox_spacing[ax]  # voxel units per grid step
            m[ax, k] = step
            m[ax, 3] = (n[ax] - 1) / 2.0 - step * (size[k] - 1) / 2.0
        return GridGeometry(a @ m, a, shape, tuple(int(s) for s in size), axcodes=recipe.axcodes,
                            fit=recipe.fit, is_2d=True)

    world_axes = [_AXCODE[c][0] for c in recipe.axcodes]
    signs = np.array([_AXCODE[c][1] for c in recipe.axcodes])
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in n])))
    world = corners @ a[:3, :3].T + a[:3, 3]
    lo, hi = world.min(axis=0), world.max(axis=0)
    ext = (hi - lo)[world_axes]
    centre = ((hi + lo) / 2.0)[world_axes]
    size = np.asarray(recipe.spatial_size, dtype=np.float64)
    if recipe.depth_multiple is not None:
        # number of original slices along the grid depth axis: voxel axis most aligned with it
        w2 = world_axes[2]
        vox_ax = int(np.argmax(np.abs(a[w2, :3]) / vox_spacing))
        size[2] = _snap_depth(n[vox_ax], recipe.depth_multiple, recipe.spatial_size[2])
    spacing = _grid_steps_mm(ext, size, recipe)
    g = np.zeros((4, 4))
    g[3, 3] = 1.0
    for k, w in enumerate(world_axes):
        g[w, k] = signs[k] * spacing[k]
        g[w, 3] = centre[k] - signs[k] * spacing[k] * (size[k] - 1) / 2.0
    return GridGeometry(g, a, shape, tuple(int(s) for s in size), axcodes=recipe.axcodes, fit=recipe.fit)


# --------------------------------------------------------------------------------------------- sampling
def _grid_coordinates(m: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(3, *size) original voxel coordinates of every grid index under the 4x4 map ``m``."""
    i, j, k = (np.arange(s, dtype=np.float64) for s in size)
    coords = np.empty((3, *size), dtype=np.float64)
    for a in range(3):
        coords[a] = (m[a, 0] * i[:, None, None] + m[a, 1] * j[None, :, None] + m[a, 2] * k[None, None, :]
                     + m[a, 3])
    return coords


def _antialias_factors(m: np.ndarray, shape: Sequence[int]) -> tuple[int, int, int]:
    """Integer box-filter width per voxel axis: floor(voxels moved per grid step), at least 1."""
    step = np.abs(m[:3, :3]).max(axis=1)
    return tuple(int(max(1, min(int(math.floor(s + 1e-3)), n))) for s, n in zip(step, shape))  # type: ignore


def _tent_smooth(pooled: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """[1, 6, 1] / 8 along every pooled axis with f > 1 (edge-replicated). A triangle of support 2f (the
    classic antialias kernel for linear downsampling, as in PIL/torchvision) puts 3/4 of its mass on the
    centre block of f voxels and 1/8 on each neighbour block, so box(f) + this approximates it for any f;
    a box alone leaves a beat pattern for periods between f and 2f. Runs on the small pooled volume with
    scipy's separable correlate1d (single-threaded: a few ms, unaffected by busy shared cores)."""
    from scipy.ndimage import correlate1d

    arr = pooled.numpy()
    for ax, f in enumerate(factors):
        if f > 1 and arr.shape[1 + ax] > 1:
            arr = correlate1d(arr, np.array([0.125, 0.75, 0.125], dtype=arr.dtype), axis=1 + ax, mode="nearest")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _sample(volume: torch.Tensor, coords: np.ndarray, mode: str, backend: str) -> torch.Tensor:
    """Interpolate ``volume`` (C, X, Y, Z) float32 at voxel ``coords`` (3, *out) (clamped to the array;
    border values beyond) -> (C, *out) float32."""
    shape = volume.shape[1:]
    if backend == "scipy":
        from scipy.ndimage import map_coordinates

        order = 1 if mode == "trilinear" else 0
        vol = volume.numpy()
        out = np.stack([map_coordinates(vol[c], coords, order=order, mode="nearest", prefilter=False)
                        for c in range(vol.shape[0])])
        return torch.from_numpy(out.astype(np.float32, copy=False))
    grid = np.empty((*coords.shape[1:], 3), dtype=np.float32)
    for dim, ax in enumerate((2, 1, 0)):  # grid_sample's last dim is (x=W=Z, y=H=Y, z=D=X)
        n = shape[ax]
        grid[..., dim] = coords[ax] * (2.0 / (n - 1)) - 1.0 if n > 1 else 0.0
    out = F.grid_sample(volume[None], torch.from_numpy(grid)[None],
                        mode="bilinear" if mode == "trilinear" else "nearest",
                        padding_mode="border", align_corners=True)
    return out[0]


def _modality(meta: Mapping[str, Any] | None, override: str | None = None) -> str:
    """'CT', 'MR' or the raw upper-case modality ('unknown' when absent)."""
    value = override if override is not None else (meta or {}).get("modality", "unknown")
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    value = str(value or "unknown").strip().upper()
    return {"MRI": "MR", "CTA": "CT"}.get(value, value)


def _background(recipe: PreprocessingRecipe, modality: str) -> float:
    if recipe.background is not None:
        return recipe.background
    return CT_BACKGROUND_HU if modality == "CT" else 0.0


def _meta_of(img: Any) -> dict[str, Any]:
    return dict(img.meta) if isinstance(img, MetaTensor) else {}


def _affine_of(img: Any) -> np.ndarray:
    if isinstance(img, MetaTensor) and img.affine is not None:
        return np.asarray(img.affine.detach().cpu().numpy(), dtype=np.float64).reshape(4, 4)
    return np.eye(4)


def _check_finite(meta: Mapping[str, Any], x: torch.Tensor, step: str) -> None:
    """Raise ``RadFM3DInputError`` naming the image if ``step`` left NaN/Inf values in ``x`` (overflow, NaN input)."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise RadFM3DInputError(meta.get("filename_or_obj") or "<array>",
                                f"{step} gives {bad:,} of {x.numel():,} values that are NaN or Inf; the input holds "
                                "NaN/Inf or values beyond float32")


def _plain(img: Any) -> torch.Tensor:
    if isinstance(img, MetaTensor):
        return img.as_tensor()
    return torch.as_tensor(np.asarray(img) if not isinstance(img, torch.Tensor) else img)


class ResampleToGrid(Transform):
    """(C, X, Y, Z) image with voxel->world RAS affine -> (C, *grid) float32 on the recipe's model grid.

    One interpolation through the composed map grid -> world -> voxel (see module docstring); values stay
    in the input's units (HU for CT); outside the scan: background. Output ``.affine`` = grid affine,
    ``meta["grid_geometry"]`` = :meth:`GridGeometry.to_dict`, ``meta["preprocessing_recipe"]`` = the recipe as a
    JSON string (strings survive MONAI's collate/decollate; ``None`` fields would not).
    ``sampler``: "torch" (grid_sample, default: as fast or faster here) or "scipy" (map_coordinates).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, recipe: PreprocessingRecipe | None = None, modality: str | None = None,
                 sampler: str = "torch") -> None:
        self.recipe = recipe if recipe is not None else PreprocessingRecipe()
        if sampler not in _BACKENDS:
            raise ValueError(f"sampler must be one of {_BACKENDS}, got {sampler!r}")
        self.modality = modality
        self.sampler = sampler

    def __call__(self, img: Any) -> MetaTensor:
        data = _plain(img)
        if data.ndim != 4:
            raise RadFM3DInputError(_meta_of(img).get("filename_or_obj", "image"),
                               f"expected a channel-first (C, X, Y, Z) image, got shape {tuple(data.shape)}")
        meta = _meta_of(img)
        shape = tuple(int(s) for s in data.shape[1:])
        modality = _modality(meta, self.modality)
        geometry = grid_geometry_of(img, self.recipe)
        m = geometry.grid_to_voxel_affine
        coords = _grid_coordinates(m, geometry.spatial_size)
        eps = 1e-4
        outside = np.zeros(geometry.spatial_size, dtype=bool)
        for ax, n in enumerate(shape):
            outside |= (coords[ax] < -0.5 - eps) | (coords[ax] > n - 0.5 + eps)

        volume = data.detach().to(device="cpu", dtype=torch.float32)
        if data.dtype != torch.float32:
            _check_finite(meta, volume, f"casting the {data.dtype} image to float32")
        # Work in the array's memory order (NIfTI readers give Fortran order, strides (.., 1, X, XY)): a
        # permuted *view* is contiguous, so pooling/sampling never copy the big volume; coordinates and
        # pooling factors are permuted alike, and the output comes out in grid order anyway.
        order = [int(ax) for ax in np.argsort([-volume.stride(1 + ax) for ax in range(3)], kind="stable")]
        volume = volume.permute(0, *[1 + ax for ax in order])
        coords = coords[order]
        shape = tuple(shape[ax] for ax in order)
        m = m[[*order, 3]]
        mode = self.recipe.interpolation
        if self.recipe.antialias and mode == "trilinear":
            factors = _antialias_factors(m, shape)
            if max(factors) > 1:
                volume = _tent_smooth(F.avg_pool3d(volume[None], kernel_size=factors, stride=factors,
                                                   ceil_mode=True)[0], factors)
                for ax, f in enumerate(factors):  # pooled voxel p covers original [p f, p f + f - 1]
                    coords[ax] = (coords[ax] - (f - 1) / 2.0) / f
        for ax in range(3):
            np.clip(coords[ax], 0.0, volume.shape[1 + ax] - 1, out=coords[ax])
        out = _sample(volume, coords, mode, self.sampler)
        if outside.any():
            out[:, torch.from_numpy(outside)] = _background(self.recipe, modality)

        meta.pop("affine", None)
        meta.update({"grid_geometry": geometry.to_dict(), "preprocessing_recipe": self.recipe.to_json(indent=None),
                     "spatial_shape": np.asarray(geometry.spatial_size), "space": "RAS",
                     "modality": modality if modality != "UNKNOWN" else "unknown"})
        return MetaTensor(out, affine=torch.as_tensor(geometry.grid_affine, dtype=torch.float64), meta=meta)


class ModalityIntensity(Transform):
    """(C, H, W, D) values in scanner units -> (num_channels, H, W, D') float32 in [0, 1].

    - CT (``intensity="auto"``): one channel per (level, width) HU window, ``clip((x - (level - width/2)) /
      width, 0, 1)``; a single window is replicated.
    - MR / other (``auto`` or ``percentile``): robust (low, high) percentiles -> (0, 1), clipped; for a
      non-negative volume the zero background is ignored when picking percentiles. Replicated to channels.
    - ``minmax`` (RadFM): (x - min) / (max - min) for every modality; channels replicated.
    Multi-channel non-CT input (RGB) keeps its channels when there are ``num_channels`` of them, else is
    averaged to grey. A depth-1 image flagged 2D is replicated along depth to the grid depth (RadFM).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, recipe: PreprocessingRecipe | None = None, modality: str | None = None) -> None:
        self.recipe = recipe if recipe is not None else PreprocessingRecipe()
        self.modality = modality

    @staticmethod
    def _percentile_scale(x: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, float, float]:
        values = x.reshape(-1)
        if values.numel() and float(values.min()) >= 0.0:
            nonzero = values[values != 0]
            if nonzero.numel() >= max(1, values.numel() // 100):
                values = nonzero
        arr = values.numpy()
        if arr.size > 4_000_000:  # deterministic subsample keeps percentiles cheap on big grids
            arr = arr[:: arr.size // 2_000_000]
        if arr.size == 0:
            return torch.zeros_like(x), 0.0, 0.0
        lo, hi = (float(v) for v in np.percentile(arr, [low, high]))
        if hi <= lo:
            return (x > lo).to(torch.float32), lo, hi
        return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0), lo, hi

    def __call__(self, img: Any) -> MetaTensor | torch.Tensor:
        data = _plain(img).detach().to(device="cpu", dtype=torch.float32)
        meta = _meta_of(img)
        recipe = self.recipe
        modality = _modality(meta, self.modality)
        nc = recipe.num_channels
        record: dict[str, Any] = {"modality": modality}
        if recipe.intensity == "auto" and modality == "CT":
            hu = data.mean(dim=0) if data.shape[0] > 1 else data[0]
            windows = recipe.ct_windows if len(recipe.ct_windows) == nc else recipe.ct_windows * nc
            lows = torch.tensor([lv - wd / 2.0 for lv, wd in windows], dtype=torch.float32).view(-1, 1, 1, 1)
            widths = torch.tensor([wd for _, wd in windows], dtype=torch.float32).view(-1, 1, 1, 1)
            out = ((hu[None] - lows) / widths).clamp_(0.0, 1.0)  # (n_windows, H, W, D), one fused pass
            record.update(mode="ct_windows", windows=[list(w) for w in windows])
        else:
            x = data if data.shape[0] == nc else data.mean(dim=0, keepdim=True)
            if recipe.intensity == "minmax":
                lo, hi = float(x.min()), float(x.max())
                out = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
                record.update(mode="minmax")
            else:
                out, lo, hi = self._percentile_scale(x, *recipe.mr_percentiles)
                record.update(mode="percentile", percentiles=list(recipe.mr_percentiles))
            record.update(range=[lo, hi])
            if out.shape[0] != nc:
                out = out.expand(nc, *out.shape[1:])
        grid_depth = (recipe.spatial_size_2d or recipe.spatial_size)[2]
        if out.shape[-1] == 1 and grid_depth > 1 and _is_2d(tuple(data.shape[1:]), meta):
            out = out.expand(*out.shape[:-1], grid_depth)  # 2D: replicate the slice along depth (RadFM)
        out = out.contiguous().to(torch.float32)
        _check_finite(meta, out, f"intensity scaling ({record['mode']})")  # small grid: cheap
        if not isinstance(img, MetaTensor):
            return out
        meta.pop("affine", None)
        meta["intensity"] = json.dumps(record)  # a string: collates across CT/MR samples with different keys
        return MetaTensor(out, affine=img.affine, meta=meta)


class LoadScan(Transform):
    """path / folder / array -> channel-first MetaTensor via :func:`radfm3d.io.load_image` (kwargs passed on)."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, **load_kwargs: Any) -> None:
        self.load_kwargs = load_kwargs

    def __call__(self, source: Any, modality: str | None = None) -> MetaTensor:
        from radfm3d.io import load_image

        kwargs = dict(self.load_kwargs)
        if modality is not None and kwargs.get("modality") is None:
            kwargs["modality"] = modality
        return load_image(source, **kwargs)


class _RecipeMapTransform(MapTransform):
    """Shared plumbing of the dictionary wrappers: apply ``self.transform`` to every present key."""

    transform: Transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class ResampleToGridd(_RecipeMapTransform):
    """Dictionary wrapper of :class:`ResampleToGrid`."""

    backend = ResampleToGrid.backend

    def __init__(self, keys: KeysCollection, recipe: PreprocessingRecipe | None = None, modality: str | None = None,
                 sampler: str = "torch", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ResampleToGrid(recipe, modality=modality, sampler=sampler)


class ModalityIntensityd(_RecipeMapTransform):
    """Dictionary wrapper of :class:`ModalityIntensity`."""

    backend = ModalityIntensity.backend

    def __init__(self, keys: KeysCollection, recipe: PreprocessingRecipe | None = None, modality: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ModalityIntensity(recipe, modality=modality)


class LoadScand(MapTransform):
    """Dictionary wrapper of :class:`LoadScan`; ``modality_key`` (e.g. a manifest's "modality") is a hint."""

    backend = LoadScan.backend

    def __init__(self, keys: KeysCollection, modality_key: str | None = "modality", allow_missing_keys: bool = False,
                 **load_kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        self.loader = LoadScan(**load_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        hint = d.get(self.modality_key) if self.modality_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key], modality=hint if isinstance(hint, str) else None)
        return d


def preprocessing_transforms(recipe: PreprocessingRecipe | None = None, keys: KeysCollection = ("image",),
                             load: bool = True, allow_missing_keys: bool = False, sampler: str = "torch",
                             **load_kwargs: Any) -> Compose:
    """``Compose([LoadScand?, ResampleToGridd, ModalityIntensityd])`` for dictionaries of ``keys``."""
    recipe = recipe if recipe is not None else PreprocessingRecipe()
    steps: list[Transform] = []
    if load:
        steps.append(LoadScand(keys, allow_missing_keys=allow_missing_keys, **load_kwargs))
    steps += [ResampleToGridd(keys, recipe, sampler=sampler, allow_missing_keys=allow_missing_keys),
              ModalityIntensityd(keys, recipe, allow_missing_keys=allow_missing_keys)]
    return Compose(steps)


def preprocess(image: Any, recipe: PreprocessingRecipe | None = None, *, modality: str | None = None,
               sampler: str = "torch") -> MetaTensor:
    """Scan -> ``(num_channels, *grid)`` float32 in [0, 1] with ``meta["grid_geometry"]``.

    ``image``: a MetaTensor from :func:`radfm3d.io.load_image` (a path is loaded with it first).
    """
    recipe = recipe if recipe is not None else PreprocessingRecipe()
    if isinstance(image, (str, os.PathLike)):
        image = LoadScan()(image, modality=modality)
    resampled = ResampleToGrid(recipe, modality=modality, sampler=sampler)(image)
    return ModalityIntensity(recipe, modality=modality)(resampled)  # type: ignore[return-value]
