# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadPhantom: a deterministic generator of synthetic CT/MRI scans with known findings.

Spec: ``shared/design/PHANTOM_BENCHMARK.md``. The anatomy is analytic: ellipsoids (organs with a little smooth
boundary "wobble", findings exact) placed in **world patient coordinates, RAS+ mm** (+x = patient Right,
+y = Anterior, +z = Superior; nibabel/NIfTI convention). A scan is made by evaluating that phantom at every
voxel centre's world position through the voxel->world affine, so any acquisition orientation (axial RAS/LPS,
flipped axes, sagittal, coronal) is exact and left/right is only recoverable through the geometry.

Determinism: every case draws from ``numpy.random.default_rng([seed, index, stream])`` (independent streams for
anatomy/findings, geometry, noise, the prior scan and the texts), so a case never depends on the number of
workers or on which other cases were generated.

Public API::

    scan, prior, gt = render_case(seed, index)          # PhantomScan(s) + JSON-able ground truth
    image, gt = make_case(seed, index)                  # MetaTensor (1, X, Y, Z) + ground truth
    summary = generate_phantoms(out_dir, n, seed)       # files + train/val/test.jsonl + cases.jsonl
    radfm3d phantoms --n 2000 --out DIR --seed 0 --workers 2

Output layout of :func:`generate_phantoms` (``out_dir``)::

    images/shard-000/case-000123.nii.gz          current scan (int16; HU for CT, a.u. for MR)
    images/shard-000/case-000123-prior.nii.gz    prior scan (comparison cases only)
    dicom/shard-000/case-000123/slice_0000.dcm   DICOM series copy (a ``dicom_fraction`` of cases)
    meta/shard-000/case-000123.json              per-case sidecar (ground truth + task records) = done marker
    train.jsonl / val.jsonl / test.jsonl         task manifests (CONTRACTS.md format)
    cases.jsonl                                  ground truth per case
    preprocessing.json, dataset.json             the grid recipe used for boxes; run summary

Resumability: every file is written under a temporary name in its final folder and moved with ``os.replace``;
the sidecar is written last. A case is done when its sidecar exists, was made with the same settings and all
the files it lists exist; otherwise the whole case is rewritten. Leftover temporary files are removed on start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radfm3d.utils import progress_bar

__all__ = [
    "GENERATOR_VERSION",
    "REGIONS",
    "FINDING_TYPES",
    "ORGANS",
    "SIDES",
    "CHANGES",
    "FINDING_SITES",
    "REGION_FINDING_ORGANS",
    "PhantomScan",
    "render_case",
    "make_case",
    "generate_phantoms",
    "split_of",
    "cli",
]

GENERATOR_VERSION = 1
REGIONS = ("head", "chest", "abdomen")
#: finding types the generator produces (the evaluation vocabulary merges these names)
FINDING_TYPES = ("nodule", "mass", "cyst", "hemorrhage", "calcification")
#: organ names used in ground truth (``organ`` + ``side`` identify a structure, e.g. kidney/left). ``side`` is
#: "left"/"right" for paired structures (lungs, kidneys, cerebral hemispheres, ventricles) and "none" otherwise
#: (liver, spleen, heart ...); ``body_side`` always gives the patient side of a centre (x > midline = right).
ORGANS = ("brain", "ventricles", "skull", "lung", "heart", "spine", "liver", "spleen", "kidney")
SIDES = ("left", "right", "none")
CHANGES = ("new", "grown", "shrunk", "resolved", "stable")
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))

# stream ids of the per-case random generators
_S_CASE, _S_GEOM, _S_NOISE, _S_PRIOR_GEOM, _S_PRIOR_NOISE, _S_TEXT = range(6)

# ----------------------------------------------------------------------------------------------- tissues
#: tissue -> (CT HU, MR T1 a.u., MR T2 a.u.) before per-case jitter
TISSUES: dict[str, tuple[float, float, float]] = {
    "air": (-1000.0, 0.0, 0.0),
    "fat": (-100.0, 900.0, 650.0),
    "soft": (45.0, 450.0, 300.0),
    "bone": (900.0, 60.0, 50.0),
    "vertebra": (450.0, 650.0, 450.0),
    "csf": (8.0, 150.0, 1000.0),
    "brain": (35.0, 560.0, 450.0),
    "lung": (-850.0, 20.0, 30.0),
    "heart": (45.0, 300.0, 400.0),
    "liver": (60.0, 600.0, 250.0),
    "spleen": (48.0, 450.0, 450.0),
    "kidney": (32.0, 500.0, 550.0),
    "cyst": (8.0, 150.0, 1100.0),
    "hemorrhage": (72.0, 820.0, 250.0),
    "calcification": (650.0, 40.0, 40.0),
    "nodule": (40.0, 350.0, 600.0),
    "mass": (40.0, 350.0, 700.0),
}
#: CT HU of a mass per host organ (hypo- or hyperdense relative to the organ)
_MASS_CT = {"brain": 50.0, "liver": 36.0, "kidney": 55.0, "lung": 42.0, "spleen": 62.0}

#: organ -> finding types plausible there
FINDING_SITES: dict[str, tuple[str, ...]] = {
    "brain": ("hemorrhage", "mass", "cyst", "calcification"),
    "lung": ("nodule", "mass", "calcification"),
    "liver": ("cyst", "mass", "calcification"),
    "spleen": ("cyst", "calcification"),
    "kidney": ("cyst", "mass", "calcification"),
}
#: region -> the (organ, side) pairs that can hold a finding, in the order reports and readings list them
REGION_FINDING_ORGANS: dict[str, tuple[tuple[str, str], ...]] = {
    "head": (("brain", "right"), ("brain", "left")),
    "chest": (("lung", "right"), ("lung", "left")),
    "abdomen": (("liver", "none"), ("spleen", "none"), ("kidney", "right"), ("kidney", "left")),
}
#: finding type -> (min, max) longest diameter in mm
FINDING_SIZE_MM: dict[str, tuple[float, float]] = {
    "nodule": (4.0, 20.0), "mass": (18.0, 45.0), "cyst": (6.0, 30.0), "hemorrhage": (8.0, 35.0),
    "calcification": (2.0, 8.0),
}


# ----------------------------------------------------------------------------------------------- shapes
@dataclass
class Ellipsoid:
    """An ellipsoid in world RAS mm: ``|diag(1/radii) R^T (x - centre)| <= 1`` (times the wobble)."""

    name: str                     # structure name, e.g. "left_kidney" or "finding-0"
    tissue: str                   # key of TISSUES, or "value" for an explicit value
    centre: np.ndarray            # (3,) mm
    radii: np.ndarray             # (3,) mm
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))  # (3, 3), columns = local axes in world
    wobble: float = 0.0           # relative amplitude of the smooth boundary deformation
    phase: np.ndarray = field(default_factory=lambda: np.zeros(3))
    organ: str = ""               # organ name (ORGANS) for organs, host organ for findings
    side: str = "none"
    value: float | None = None    # explicit intensity (findings)

    def world_box(self) -> np.ndarray:
        """Axis-aligned bounding box ``(x1, y1, z1, x2, y2, z2)`` in world mm (exact for wobble 0)."""
        half = np.sqrt(((self.rotation * self.radii[None, :]) ** 2).sum(axis=1)) * (1.0 + self.wobble)
        return np.concatenate([self.centre - half, self.centre + half])

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: points (N, 3) in world mm inside the (wobble-free) ellipsoid."""
        u = ((np.asarray(points, dtype=np.float64) - self.centre) @ self.rotation) / self.radii
        return (u ** 2).sum(axis=-1) <= 1.0


def _rotation(rng: np.random.Generator, max_deg: float, full: bool = False) -> np.ndarray:
    """Random rotation: any orientation (``full``) or about z by up to ``max_deg`` plus a small tilt."""
    if full:
        q = rng.standard_normal(4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    a, b = np.deg2rad(rng.uniform(-max_deg, max_deg)), np.deg2rad(rng.uniform(-max_deg, max_deg) / 3)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


# ----------------------------------------------------------------------------------------------- anatomy
# (structure, organ, side, tissue, centre as fraction of body half-extent, radii as fraction), paint order.
# x fractions: + = patient right (RAS). Later entries paint over earlier ones.
_ANATOMY: dict[str, list[tuple[str, str, str, str, tuple[float, float, float], tuple[float, float, float]]]] = {
    "head": [
        ("scalp", "", "none", "soft", (0, 0, 0), (1.0, 1.0, 1.0)),
        ("skull", "skull", "none", "bone", (0, 0, 0), (0.94, 0.94, 0.94)),
        ("csf_space", "", "none", "csf", (0, 0, 0), (0.86, 0.86, 0.86)),
        ("right_hemisphere", "brain", "right", "brain", (0.425, 0, 0), (0.41, 0.82, 0.82)),
        ("left_hemisphere", "brain", "left", "brain", (-0.425, 0, 0), (0.41, 0.82, 0.82)),
        ("right_ventricle", "ventricles", "right", "csf", (0.12, 0.05, 0.12), (0.07, 0.32, 0.14)),
        ("left_ventricle", "ventricles", "left", "csf", (-0.12, 0.05, 0.12), (0.07, 0.32, 0.14)),
    ],
    "chest": [
        ("body_fat", "", "none", "fat", (0, 0, 0), (1.0, 1.0, 1.15)),
        ("body_muscle", "", "none", "soft", (0, 0, 0), (0.9, 0.88, 1.2)),
        ("right_lung", "lung", "right", "lung", (0.42, 0.02, 0.08), (0.36, 0.62, 0.8)),
        ("left_lung", "lung", "left", "lung", (-0.44, 0.02, 0.08), (0.33, 0.6, 0.78)),
        ("heart", "heart", "none", "heart", (-0.1, 0.3, -0.22), (0.28, 0.3, 0.36)),
        ("spine", "spine", "none", "vertebra", (0, -0.66, 0), (0.11, 0.13, 1.6)),
    ],
    "abdomen": [
        ("body_fat", "", "none", "fat", (0, 0, 0), (1.0, 1.0, 1.15)),
        ("body_muscle", "", "none", "soft", (0, 0, 0), (0.9, 0.86, 1.2)),
        ("liver", "liver", "none", "liver", (0.38, 0.08, 0.32), (0.44, 0.52, 0.42)),
        ("spleen", "spleen", "none", "spleen", (-0.55, -0.15, 0.32), (0.18, 0.26, 0.3)),
        ("right_kidney", "kidney", "right", "kidney", (0.4, -0.42, -0.28), (0.15, 0.17, 0.3)),
        ("left_kidney", "kidney", "left", "kidney", (-0.4, -0.42, -0.22), (0.15, 0.17, 0.3)),
        ("spine", "spine", "none", "vertebra", (0, -0.64, 0), (0.1, 0.12, 1.6)),
    ],
}
#: body half-extent as a fraction of the field of view along (x, y, z) world axes
_BODY_FRACTION = {"head": (0.40, 0.45, 0.44), "chest": (0.46, 0.36, 0.44), "abdomen": (0.46, 0.38, 0.44)}


def _body_side(x: float, midline_x: float) -> str:
    """Patient side of a world x (RAS: +x = patient Right) relative to the body midline."""
    return "right" if x > midline_x else "left"


def organ_label(organ: str, side: str) -> str:
    """Human name of a structure: ("kidney", "left") -> "left kidney"; ("brain", "right") -> "right cerebral
    hemisphere"; ("liver", "right") -> "liver" (side implied)."""
    if organ == "brain" and side in ("left", "right"):
        return f"{side} cerebral hemisphere"
    if side not in ("left", "right"):
        return organ
    return f"{side} {organ}"


# ----------------------------------------------------------------------------------------------- geometry
@dataclass
class Acquisition:
    """A scan's voxel grid: ``shape`` (X, Y, Z voxels; Z = slice axis) and ``affine`` voxel -> world RAS mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    plane: str       # "axial" | "coronal" | "sagittal"
    axcodes: str     # e.g. "LPS"

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def world_extent(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) world mm of the voxel extents ``[-0.5, n - 0.5]``."""
        corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in self.shape])))
        w = corners @ self.affine[:3, :3].T + self.affine[:3, 3]
        return w.min(axis=0), w.max(axis=0)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.world_extent()
        return {"shape": list(self.shape), "spacing_mm": _r(self.spacing, 4), "affine": _r(self.affine, 5),
                "plane": self.plane, "axcodes": self.axcodes, "fov_mm": _r(hi - lo, 2)}


def _r(a: Any, nd: int = 3) -> Any:
    """Round for JSON (lists of floats)."""
    arr = np.asarray(a, dtype=np.float64)
    return np.round(arr, nd).tolist()


_PLANE_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}  # world axis of voxel i, j, k
_AXNAMES = ("RL", "AP", "SI")  # letter for +/- direction of each world axis


def sample_acquisition(rng: np.random.Generator, body_centre: np.ndarray, plane: str | None = None,
                       size_range: tuple[int, int] = (96, 192), slices_range: tuple[int, int] = (24, 64)
                       ) -> Acquisition:
    """Random scan geometry: in-plane 0.6-1.2 mm, slices 1-5 mm, 96-192 matrix, 24-64 slices, any orientation.

    The slice axis is always the third voxel axis (as in DICOM series and most NIfTI conversions); the in-plane
    axes may be swapped and every axis may point either way along its world axis.
    """
    if plane is None:
        plane = str(rng.choice(["axial", "coronal", "sagittal"], p=[0.7, 0.15, 0.15]))
    n_ip = int(rng.integers(size_range[0] // 16, size_range[1] // 16 + 1)) * 16
    n_ip2 = n_ip if rng.random() < 0.7 else max(size_range[0], int(round(n_ip * rng.uniform(0.8, 1.0) / 16)) * 16)
    s_lo = max(0.6, 110.0 / n_ip2)  # field of view >= 110 mm
    s_ip = float(rng.uniform(s_lo, max(1.2, s_lo)))
    fov = n_ip2 * s_ip
    # slice coverage between 0.75x and 1.3x the in-plane FOV (thin slices on small FOVs)
    s_sl_lo = max(1.0, 0.75 * fov / slices_range[1])
    s_sl = float(rng.uniform(s_sl_lo, max(5.0, s_sl_lo)))
    n_sl = int(np.clip(round(fov * rng.uniform(0.75, 1.3) / s_sl), slices_range[0], slices_range[1]))
    axes = list(_PLANE_AXES[plane])
    if rng.random() < 0.5:
        axes[0], axes[1] = axes[1], axes[0]
    convention = rng.choice(["RAS", "LPS", "random"], p=[0.4, 0.35, 0.25])
    if convention == "RAS":
        signs = {0: 1.0, 1: 1.0, 2: 1.0}
    elif convention == "LPS":
        signs = {0: -1.0, 1: -1.0, 2: 1.0}
    else:
        signs = {w: float(rng.choice([-1.0, 1.0])) for w in range(3)}
    shape = [n_ip, n_ip2, n_sl]
    spacing = [s_ip, s_ip, s_sl]
    affine = np.eye(4)
    for v, w in enumerate(axes):
        affine[:3, v] = 0.0
        affine[w, v] = signs[w] * spacing[v]
    centre_vox = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
    fov_centre = body_centre + rng.uniform(-0.03, 0.03, 3) * fov
    affine[:3, 3] = fov_centre - affine[:3, :3] @ centre_vox
    axcodes = "".join(_AXNAMES[w][0 if signs[w] > 0 else 1] for w in axes)
    return Acquisition((n_ip, n_ip2, n_sl), affine, plane, axcodes)


# ----------------------------------------------------------------------------------------------- rendering
@dataclass
class PhantomScan:
    """One rendered scan. ``array`` (X, Y, Z) float32 (HU for CT, arbitrary units for MR, values rounded to
    integers = what is stored); ``affine`` 4x4 voxel -> world RAS mm; ``labels`` (X, Y, Z) uint8, finding
    ``k`` of ``findings`` is ``k + 1`` where its voxel centre lies inside it."""

    array: np.ndarray
    affine: np.ndarray
    labels: np.ndarray
    acquisition: Acquisition
    modality: str
    findings: list[dict[str, Any]]

    def to_metatensor(self) -> Any:
        """MetaTensor (1, X, Y, Z) with ``affine`` and load_image-style meta (needs monai/torch)."""
        import torch
        from monai.data import MetaTensor

        meta = {"space": "RAS", "source_format": "array", "modality": self.modality,
                "original_shape": tuple(self.array.shape),
                "original_spacing": tuple(map(float, self.acquisition.spacing)),
                "original_affine": self.affine.copy(), "is_2d": False, "filename_or_obj": ""}
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(self.array[None])),
                          affine=torch.as_tensor(self.affine, dtype=torch.float64), meta=meta)


def _index_block(acq: Acquisition, box: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Voxel index slices whose centres may fall in the world box (None when outside the volume)."""
    inv = np.linalg.inv(acq.affine)
    corners = np.array(list(itertools.product(*[(box[a], box[a + 3]) for a in range(3)])))
    v = corners @ inv[:3, :3].T + inv[:3, 3]
    lo = np.maximum(np.floor(v.min(axis=0)) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(v.max(axis=0)) + 2, acq.shape).astype(int)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _block_d2(acq: Acquisition, e: Ellipsoid, block: tuple[slice, slice, slice]) -> np.ndarray:
    """Squared normalised ellipsoid radius ``|diag(1/r) R^T (x_world - c)|^2`` at the block's voxel centres.

    ``u = M x + o`` is affine in the voxel index ``x = (i, j, k)``, so ``|u|^2`` is a quadratic form: the (i, j)
    terms are built once in 2D and only three full-size float32 operations remain (``A + B k + C k^2``).
    Indices are taken relative to the block centre to keep float32 cancellation negligible.
    """
    a = acq.affine
    m = (e.rotation.T @ a[:3, :3]) / e.radii[:, None]          # voxel index -> local unit coords
    x0 = np.array([(s.start + s.stop - 1) / 2.0 for s in block])
    o = (e.rotation.T @ (a[:3, :3] @ x0 + a[:3, 3] - e.centre)) / e.radii
    q = m.T @ m
    g = m.T @ o
    i = (np.arange(block[0].start, block[0].stop) - x0[0])[:, None]
    j = (np.arange(block[1].start, block[1].stop) - x0[1])[None, :]
    k = (np.arange(block[2].start, block[2].stop) - x0[2]).astype(np.float32)
    a2 = (q[0, 0] * i * i + q[1, 1] * j * j + 2 * q[0, 1] * i * j + 2 * g[0] * i + 2 * g[1] * j + o @ o)
    b2 = 2 * (q[0, 2] * i + q[1, 2] * j + g[2])
    d2 = b2.astype(np.float32)[:, :, None] * k
    d2 += a2.astype(np.float32)[:, :, None]
    d2 += (np.float32(q[2, 2]) * k * k)[None, None, :]
    return d2


def _block_wobble(acq: Acquisition, e: Ellipsoid, block: tuple[slice, slice, slice]) -> np.ndarray:
    """Smooth boundary modulation ``prod_w sin(2.5 t_w + phase_w)`` with ``t_w = (x_w - c_w) / r_w`` in world
    axes (independent of the acquisition); separable outer product when voxel axes are world-aligned."""
    a = acq.affine
    idx = [np.arange(s.start, s.stop, dtype=np.float64) for s in block]
    aligned = all(np.count_nonzero(np.abs(a[:3, v]) > 1e-9) == 1 for v in range(3))
    if aligned:
        factors = [np.ones(len(ix)) for ix in idx]
        for v in range(3):
            w = int(np.argmax(np.abs(a[:3, v])))
            t = (a[w, v] * idx[v] + a[w, 3] - e.centre[w]) / e.radii[w]
            factors[v] = factors[v] * np.sin(2.5 * t + e.phase[w])
        f2 = (factors[0][:, None] * factors[1][None, :]).astype(np.float32)
        return f2[:, :, None] * factors[2].astype(np.float32)
    out = np.ones([len(ix) for ix in idx], dtype=np.float32)
    for w in range(3):
        t = sum((a[w, v] * idx[v]).reshape([-1 if q == v else 1 for q in range(3)]) for v in range(3))
        out *= np.sin(2.5 * (t + a[w, 3] - e.centre[w]) / e.radii[w] + e.phase[w]).astype(np.float32)
    return out


def _paint(vol: np.ndarray, acq: Acquisition, e: Ellipsoid, value: float, labels: np.ndarray | None = None,
           label: int = 0) -> int:
    """Blend ``value`` into ``vol`` with partial-volume edges; returns the number of voxel centres inside
    the (wobble-free) ellipsoid, which are labelled ``label`` in ``labels`` when given."""
    block = _index_block(acq, e.world_box())
    if block is None:
        return 0
    d2 = _block_d2(acq, e, block)
    count = 0
    if labels is not None:
        inside = d2 <= 1.0
        labels[block][inside] = label
        count = int(np.count_nonzero(inside))
    d = np.sqrt(d2, out=d2)
    if e.wobble > 0:
        wob = _block_wobble(acq, e, block)
        wob *= np.float32(e.wobble)
        wob += np.float32(1.0)
        d /= wob
    # fraction of the voxel inside: linear ramp over about one voxel across the boundary
    h = float(np.sqrt((acq.spacing ** 2).mean()))
    slope = np.float32(float(3.0 / (1.0 / e.radii).sum()) / h)
    occ = d
    occ *= -slope
    occ += np.float32(0.5) + slope
    np.clip(occ, 0.0, 1.0, out=occ)
    sub = vol[block]
    delta = np.float32(value) - sub
    delta *= occ
    sub += delta
    return count


def _tissue_values(modality: str, sequence: str | None, rng: np.random.Generator) -> dict[str, float]:
    """Per-case tissue intensities: CT HU with small jitter; MR a.u. with a random global gain."""
    col = {"CT": 0, "T1": 1, "T2": 2}[sequence if modality == "MR" else "CT"]
    if modality == "CT":
        return {k: v[col] + (rng.normal(0, 3.0) if k != "air" else 0.0) for k, v in TISSUES.items()}
    gain = rng.uniform(0.6, 1.6)
    return {k: v[col] * gain * rng.uniform(0.93, 1.07) for k, v in TISSUES.items()}


def _finding_value(ftype: str, organ: str, modality: str, values: dict[str, float]) -> float:
    if ftype == "mass" and modality == "CT":
        return _MASS_CT.get(organ, values["mass"])
    return values[ftype]


def render_scan(acq: Acquisition, organs: list[Ellipsoid], findings: list[Ellipsoid], modality: str,
                sequence: str | None, values: dict[str, float], rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Evaluate the phantom on the acquisition grid; returns (array float32, labels uint8, voxels per finding)."""
    vol = np.full(acq.shape, values["air"], dtype=np.float32)
    labels = np.zeros(acq.shape, dtype=np.uint8)
    for e in organs:
        _paint(vol, acq, e, values[e.tissue])
    counts = [_paint(vol, acq, f, float(f.value), labels, k + 1) for k, f in enumerate(findings)]
    from scipy.ndimage import gaussian_filter

    sigma_mm = rng.uniform(0.4, 0.9)
    sigma = [min(1.0, sigma_mm / s) for s in acq.spacing]
    vol = gaussian_filter(vol, sigma=sigma, mode="nearest", truncate=2.5)
    if modality == "CT":
        vol += rng.standard_normal(acq.shape, dtype=np.float32) * np.float32(rng.uniform(4.0, 15.0))
        np.clip(vol, -1024.0, 3071.0, out=vol)
    else:
        vol *= _bias_field(acq, rng)
        sd = np.float32(rng.uniform(0.01, 0.03) * max(values.values()))
        n1 = rng.standard_normal(acq.shape, dtype=np.float32) * sd
        n2 = rng.standard_normal(acq.shape, dtype=np.float32) * sd
        vol = np.sqrt((vol + n1) ** 2 + n2 * n2)
        np.clip(vol, 0.0, 32767.0, out=vol)
    np.rint(vol, out=vol)  # what int16 storage keeps
    return vol, labels, counts


def _bias_field(acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative MR bias field exp(linear + quadratic in world mm), shape acq.shape, float32."""
    lo, hi = acq.world_extent()
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    lin = rng.uniform(-0.25, 0.25, 3)
    quad = rng.uniform(-0.2, 0.1, 3)
    field_ = np.zeros(acq.shape, dtype=np.float32)
    a = acq.affine
    for w in range(3):  # world coordinate w as a function of voxel indices (broadcast sum)
        coord = np.float32(a[w, 3] - centre[w])
        parts = [(np.arange(n, dtype=np.float32) * np.float32(a[w, v])).reshape([-1 if q == v else 1 for q in range(3)])
                 for v, n in enumerate(acq.shape)]
        t = (parts[0] + parts[1] + (parts[2] + coord)) / np.float32(half[w])
        field_ += np.float32(lin[w]) * t + np.float32(quad[w]) * t * t
    return np.exp(field_, out=field_)


# ----------------------------------------------------------------------------------------------- case sampling
def split_of(seed: int, index: int) -> str:
    """Split of case ``index``: fixed by (seed, index), independent of n; a golden-ratio sequence keeps
    80/10/10 proportions even for small n."""
    offset = np.random.default_rng([seed, 1_000_003]).random()
    u = (offset + index * 0.6180339887498949) % 1.0
    acc = 0.0
    for name, frac in SPLITS:
        acc += frac
        if u < acc:
            return name
    return SPLITS[-1][0]


def _build_anatomy(region: str, body_half: np.ndarray, body_centre: np.ndarray,
                   rng: np.random.Generator) -> list[Ellipsoid]:
    organs = []
    for name, organ, side, tissue, c, r in _ANATOMY[region]:
        is_body = organ == "" and name in ("scalp", "body_fat")
        jit = 0.0 if is_body else 0.025
        centre = body_centre + (np.asarray(c) + rng.uniform(-jit, jit, 3)) * body_half
        radii = np.asarray(r) * body_half * (1.0 if organ in ("brain", "skull", "") else rng.uniform(0.9, 1.08, 3))
        if organ in ("brain", "skull") or name in ("csf_space",):
            rot, wob = np.eye(3), 0.0
        else:
            rot = _rotation(rng, 8.0) if organ not in ("spine",) else np.eye(3)
            wob = float(rng.uniform(0.0, 0.06)) if organ not in ("spine", "ventricles") else 0.0
        organs.append(Ellipsoid(name, tissue, centre, radii, rot, wob, rng.uniform(0, 2 * np.pi, 3), organ, side))
    return organs


def _size_limits(ftype: str, host: Ellipsoid, spacing: np.ndarray) -> tuple[float, float]:
    """(min, max) longest diameter in mm: type range, fits in the host organ, >= one voxel diagonal."""
    lo, hi = FINDING_SIZE_MM[ftype]
    vox_diag = float(np.linalg.norm(spacing)) * 1.1
    hi = min(hi, 0.75 * 2 * float(host.radii.min()))
    lo = max(lo, vox_diag)
    return lo, max(lo, hi)


def _place_finding(ftype: str, host: Ellipsoid, size_mm: float, organs: list[Ellipsoid],
                   placed: list[Ellipsoid], rng: np.random.Generator) -> Ellipsoid | None:
    """An ellipsoid finding of longest diameter ``size_mm`` inside ``host``, not overlapping later-painted
    organs or other findings; None when no place is found."""
    later = organs[organs.index(host) + 1:]
    for _ in range(40):
        radii = size_mm / 2 * np.concatenate([[1.0], rng.uniform(0.75, 1.0, 2)])
        rot = _rotation(rng, 0, full=True)
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        rmax = size_mm / 2
        shrink = max(0.0, 1.0 - rmax / float(host.radii.min()) - 0.08)
        local = d * rng.uniform(0, 1) ** (1 / 3) * shrink
        centre = host.centre + host.rotation @ (local * host.radii)
        cand = Ellipsoid(f"finding-{len(placed)}", ftype, centre, radii, rot, organ=host.organ, side=host.side)
        # sample points on the finding's surface + centre: all inside host, none inside later organs
        pts = centre + (_sphere_points() * radii) @ rot.T
        pts = np.vstack([pts, centre[None]])
        if not host.contains(pts).all():
            continue
        if any(o.contains(pts).any() for o in later if o.organ not in ("",)):
            continue
        if host.organ == "brain" and any(o.contains(pts).any() for o in organs if o.organ == "ventricles"):
            continue
        if any(np.linalg.norm(p.centre - centre) < (p.radii.max() + rmax) * 1.1 for p in placed):
            continue
        return cand
    return None


_SPHERE_PTS: np.ndarray | None = None


def _sphere_points() -> np.ndarray:
    global _SPHERE_PTS
    if _SPHERE_PTS is None:
        g = np.random.default_rng(0).standard_normal((64, 3))
        _SPHERE_PTS = np.vstack([g / np.linalg.norm(g, axis=1, keepdims=True), np.eye(3), -np.eye(3)])
    return _SPHERE_PTS


def _sample_findings(region: str, modality: str, organs: list[Ellipsoid], spacing_bound: np.ndarray,
                     n: int, rng: np.random.Generator, values: dict[str, float]) -> list[Ellipsoid]:
    hosts = [o for o in organs if o.organ in FINDING_SITES]
    findings: list[Ellipsoid] = []
    tries = 0
    while len(findings) < n and tries < 20:
        tries += 1
        host = hosts[int(rng.integers(len(hosts)))]
        types = [t for t in FINDING_SITES[host.organ]
                 if not (modality == "MR" and host.organ == "lung" and t == "calcification")]
        ftype = types[int(rng.integers(len(types)))]
        lo, hi = _size_limits(ftype, host, spacing_bound)
        size = float(rng.uniform(lo, hi))
        f = _place_finding(ftype, host, size, organs, findings, rng)
        if f is not None:
            f.value = _finding_value(ftype, host.organ, modality, values)
            findings.append(f)
    return findings


def _finding_record(k: int, f: Ellipsoid, acq: Acquisition, n_vox: int, geom: Any, midline_x: float
                    ) -> dict[str, Any]:
    """JSON ground truth of one finding (world mm, voxel indices of the stored NIfTI, model grid)."""
    box_w = f.world_box()
    inv = np.linalg.inv(acq.affine)
    corners = np.array(list(itertools.product(*[(box_w[a], box_w[a + 3]) for a in range(3)])))
    v = corners @ inv[:3, :3].T + inv[:3, 3]
    box_v = np.concatenate([v.min(axis=0), v.max(axis=0)])
    centre_v = inv[:3, :3] @ f.centre + inv[:3, 3]
    diam = np.sort(2 * f.radii)[::-1]
    rec = {
        "id": f"f{k}", "type": f.tissue, "organ": f.organ, "side": f.side,
        "body_side": _body_side(float(f.centre[0]), midline_x),
        "location": organ_label(f.organ, f.side), "size_mm": round(float(diam[0]), 1),
        "diameters_mm": _r(diam, 1), "centre_world_mm": _r(f.centre, 2), "box_world_mm": _r(box_w, 2),
        "centre_voxel": _r(centre_v, 2), "box_voxel": _r(box_v, 2), "n_voxels": int(n_vox),
    }
    if geom is not None:
        rec.update(_grid_box_fields(geom, box_w))
    return rec


def _grid_box_fields(geom: Any, box_world: np.ndarray) -> dict[str, Any]:
    """Box on the model grid: continuous grid indices and the 0-99 text box."""
    box_g = np.asarray(geom.box_world_to_grid(box_world), dtype=np.float64)
    box99 = grid_box_to_0_99(box_g, geom.spatial_size)
    return {"box_grid": _r(box_g, 2), "box_0_99": box99, "box_text": format_box_text(box99)}


def grid_box_to_0_99(box_ijk: Sequence[float], spatial_size: Sequence[int]) -> list[int]:
    """Continuous grid box (voxel centres at integers, grid spans [-0.5, n-0.5]) -> ints 0..99."""
    from radfm3d.text.boxes import grid_box_to_normalised

    return [int(v) for v in grid_box_to_normalised(list(map(float, box_ijk)), tuple(spatial_size))]


def format_box_text(box99: Sequence[int]) -> str:
    """``<box>x1,y1,z1,x2,y2,z2</box>`` (:func:`radfm3d.text.boxes.format_box`)."""
    from radfm3d.text.boxes import format_box

    return format_box(tuple(int(v) for v in box99))


def _grid_geometry(acq: Acquisition, grid: Sequence[int] | None) -> Any:
    """GridGeometry of the default recipe (with ``grid`` as spatial_size) for this acquisition, or None."""
    if grid is None:
        return None
    from radfm3d.transforms import PreprocessingRecipe, compute_grid_geometry

    return compute_grid_geometry(acq.affine, acq.shape, PreprocessingRecipe(spatial_size=tuple(grid)))


def _clip_box_to_fov(box: np.ndarray, acq: Acquisition) -> np.ndarray:
    lo, hi = acq.world_extent()
    return np.concatenate([np.maximum(box[:3], lo), np.minimum(box[3:], hi)])


def render_case(seed: int, index: int, *, grid: Sequence[int] | None = (128, 128, 32),
                region: str | None = None, modality: str | None = None, n_findings: int | None = None,
                plane: str | None = None, prior_fraction: float = 0.25, with_prior: bool | None = None,
                dicom_fraction: float = 0.0, matrix: Sequence[int] = (96, 192), slices: Sequence[int] = (24, 64)
                ) -> tuple[PhantomScan, PhantomScan | None, dict[str, Any]]:
    """Render case ``index`` of the phantom set ``seed``.

    Args:
        grid: model grid of the default PreprocessingRecipe used for the 0-99 boxes (None: no grid fields).
        region, modality ("CT", "MR", "T1" or "T2"), n_findings, plane: force these instead of sampling.
        prior_fraction / with_prior: whether the case has a prior scan for comparison.
        dicom_fraction: probability that the case is (also) written as a DICOM series (recorded as ``dicom``).
        matrix, slices: (min, max) in-plane matrix size (multiples of 16) and number of slices; the field of
            view stays >= 110 mm, so small matrices get coarser spacing (tests use tiny ones).

    Returns:
        (current scan, prior scan or None, ground truth dict — JSON-serialisable).
    """
    rng = np.random.default_rng([seed, index, _S_CASE])
    region = region or str(rng.choice(REGIONS))
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    mod_draw, seq_draw = rng.random(), rng.random()
    if modality is None:
        modality, sequence = ("CT", None) if mod_draw < 0.6 else ("MR", "T1" if seq_draw < 0.5 else "T2")
    elif modality.upper() in ("T1", "T2"):
        modality, sequence = "MR", modality.upper()
    elif modality.upper() in ("MR", "MRI"):
        modality, sequence = "MR", "T1" if seq_draw < 0.5 else "T2"
    elif modality.upper() == "CT":
        modality, sequence = "CT", None
    else:
        raise ValueError(f"modality must be CT, MR, T1 or T2, got {modality!r}")
    n_draw = int(rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.25, 0.15]))
    n_findings = n_draw if n_findings is None else int(n_findings)
    prior_draw, dicom_draw = rng.random(), rng.random()
    has_prior = (prior_draw < prior_fraction) if with_prior is None else bool(with_prior)
    dicom = dicom_draw < dicom_fraction

    body_centre = np.array([rng.uniform(-10, 10), rng.uniform(-20, 20), rng.uniform(-150, 150)])
    size_range, slices_range = (int(matrix[0]), int(matrix[1])), (int(slices[0]), int(slices[1]))
    acq = sample_acquisition(np.random.default_rng([seed, index, _S_GEOM]), body_centre, plane, size_range,
                             slices_range)
    lo, hi = acq.world_extent()
    body_half = (hi - lo) * np.asarray(_BODY_FRACTION[region])
    organs = _build_anatomy(region, body_half, body_centre, rng)
    values = _tissue_values(modality, sequence, rng)
    # sizes must exceed the coarsest voxel of the current (and prior) scan: use a 5 mm slice bound for priors
    spacing_bound = acq.spacing if not has_prior else np.maximum(acq.spacing, [1.2, 1.2, 5.0])
    findings = _sample_findings(region, modality, organs, spacing_bound, n_findings, rng, values)

    prior_findings: list[Ellipsoid] = []
    changes: list[dict[str, Any]] = []
    if has_prior:
        prior_findings, changes = _prior_findings(findings, organs, region, modality, spacing_bound, rng, values)

    geom = _grid_geometry(acq, grid)
    arr, labels, counts = render_scan(acq, organs, findings, modality, sequence, values,
                                      np.random.default_rng([seed, index, _S_NOISE]))
    f_recs = [_finding_record(k, f, acq, counts[k], geom, body_centre[0]) for k, f in enumerate(findings)]
    scan = PhantomScan(arr, acq.affine, labels, acq, modality, f_recs)
    case_id = f"case-{index:06d}"
    gt: dict[str, Any] = {
        "case_id": case_id, "seed": int(seed), "index": int(index), "generator_version": GENERATOR_VERSION,
        "split": split_of(seed, index), "modality": modality, "sequence": sequence, "region": region,
        "space": "RAS", "units": "HU" if modality == "CT" else "a.u.", "dicom": bool(dicom),
        "geometry": acq.to_dict(), "body_centre_world_mm": _r(body_centre, 2),
        "organs": [_organ_record(o, acq, geom, body_centre[0]) for o in organs if o.organ],
        "findings": f_recs,
        "grid_geometry": geom.to_dict() if geom is not None else None,
        "prior": None,
    }
    prior_scan = None
    if has_prior:
        pacq = sample_acquisition(np.random.default_rng([seed, index, _S_PRIOR_GEOM]), body_centre, None,
                                  size_range, slices_range)
        # the prior must still cover the anatomy: same FOV scale as the current scan
        pacq = _rescale_to(pacq, acq)
        pgeom = _grid_geometry(pacq, grid)
        parr, plabels, pcounts = render_scan(pacq, organs, prior_findings, modality, sequence, values,
                                             np.random.default_rng([seed, index, _S_PRIOR_NOISE]))
        p_recs = [_finding_record(k, f, pacq, pcounts[k], pgeom, body_centre[0])
                  for k, f in enumerate(prior_findings)]
        prior_scan = PhantomScan(parr, pacq.affine, plabels, pacq, modality, p_recs)
        gt["prior"] = {"geometry": pacq.to_dict(), "findings": p_recs, "changes": changes,
                       "grid_geometry": pgeom.to_dict() if pgeom is not None else None}
    return scan, prior_scan, gt


def _organ_record(o: Ellipsoid, acq: Acquisition, geom: Any, midline_x: float) -> dict[str, Any]:
    """JSON record of an organ: name, side, centre and box (world mm, clipped to the field of view)."""
    box = _clip_box_to_fov(o.world_box(), acq)
    rec = {"structure": o.name, "organ": o.organ, "side": o.side,
           "body_side": "none" if o.organ == "spine" else _body_side(float(o.centre[0]), midline_x),
           "location": organ_label(o.organ, o.side),
           "centre_world_mm": _r(o.centre, 2), "box_world_mm": _r(box, 2)}
    if geom is not None:
        rec.update(_grid_box_fields(geom, box))
    return rec


def _rescale_to(pacq: Acquisition, ref: Acquisition) -> Acquisition:
    """Scale a sampled prior acquisition's spacing so its world extent matches the reference scan's."""
    lo, hi = ref.world_extent()
    plo, phi = pacq.world_extent()
    scale = (hi - lo) / (phi - plo)  # per world axis
    a = pacq.affine.copy()
    for v in range(3):
        w = int(np.argmax(np.abs(a[:3, v])))
        a[w, v] *= scale[w]
    centre_vox = (np.asarray(pacq.shape, dtype=np.float64) - 1) / 2.0
    a[:3, 3] = (lo + hi) / 2 - a[:3, :3] @ centre_vox
    return Acquisition(pacq.shape, a, pacq.plane, pacq.axcodes)


def _prior_findings(findings: list[Ellipsoid], organs: list[Ellipsoid], region: str, modality: str,
                    spacing_bound: np.ndarray, rng: np.random.Generator, values: dict[str, float]
                    ) -> tuple[list[Ellipsoid], list[dict[str, Any]]]:
    """Findings of the prior scan and the change of each (current findings + resolved prior-only ones)."""
    prior: list[Ellipsoid] = []
    changes: list[dict[str, Any]] = []
    for k, f in enumerate(findings):
        change = str(rng.choice(["new", "grown", "shrunk", "stable"], p=[0.25, 0.25, 0.25, 0.25]))
        size = 2 * float(f.radii.max())
        lo_mm, hi_mm = _size_limits(f.tissue, _host_of(f, organs), spacing_bound)
        if change == "grown":
            psize = size / rng.uniform(1.35, 1.8)
            if psize < lo_mm:
                change = "new"
        elif change == "shrunk":
            psize = min(size * rng.uniform(1.35, 1.8), hi_mm * 1.3)
            if psize < size * 1.3:
                change = "stable"
        if change == "new":
            changes.append({"change": "new", "current": f"f{k}", "prior": None, "type": f.tissue, "organ": f.organ,
                            "side": f.side, "size_mm": round(size, 1), "prior_size_mm": None})
            continue
        psize = size if change == "stable" else psize
        pf = Ellipsoid(f"finding-p{len(prior)}", f.tissue, f.centre.copy(), f.radii * (psize / size), f.rotation,
                       organ=f.organ, side=f.side, value=f.value)
        changes.append({"change": change, "current": f"f{k}", "prior": f"f{len(prior)}", "type": f.tissue,
                        "organ": f.organ, "side": f.side, "size_mm": round(size, 1),
                        "prior_size_mm": round(float(2 * pf.radii.max()), 1)})
        prior.append(pf)
    if rng.random() < 0.35 or not findings:
        extra = _sample_findings(region, modality, organs, spacing_bound, 1, rng, values)
        extra = [e for e in extra if all(np.linalg.norm(e.centre - f.centre) > (e.radii.max() + f.radii.max()) * 1.1
                                         for f in findings + prior)]
        for e in extra:
            changes.append({"change": "resolved", "current": None, "prior": f"f{len(prior)}", "type": e.tissue,
                            "organ": e.organ, "side": e.side, "size_mm": None,
                            "prior_size_mm": round(float(2 * e.radii.max()), 1)})
            prior.append(e)
    return prior, changes


def _host_of(f: Ellipsoid, organs: list[Ellipsoid]) -> Ellipsoid:
    return next(o for o in organs if o.organ == f.organ and o.side == f.side)


def make_case(seed: int, index: int, *, grid: Sequence[int] | None = (128, 128, 32), as_metatensor: bool = True,
              **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """In-memory case: (MetaTensor (1, X, Y, Z) with RAS affine — or (array (X, Y, Z), affine) when
    ``as_metatensor=False`` — , ground truth dict). Keyword arguments go to :func:`render_case`."""
    scan, _, gt = render_case(seed, index, grid=grid, **kwargs)
    if as_metatensor:
        return scan.to_metatensor(), gt
    return (scan.array, scan.affine), gt


# ----------------------------------------------------------------------------------------------- writing
_TMP_TAG = ".tmp-"
_SHARD_SIZE = 1000


def _case_paths(index: int) -> dict[str, str]:
    """Relative output paths of case ``index`` (sharded by 1000)."""
    shard = f"shard-{index // _SHARD_SIZE:03d}"
    cid = f"case-{index:06d}"
    return {"nifti": f"images/{shard}/{cid}.nii.gz", "prior": f"images/{shard}/{cid}-prior.nii.gz",
            "dicom": f"dicom/{shard}/{cid}", "sidecar": f"meta/{shard}/{cid}.json"}


def _tmp_name(final: Path) -> Path:
    """Hidden temporary sibling of ``final`` (same folder, same suffixes so writers pick the format)."""
    suffix = "".join(final.suffixes) if final.name.endswith(".nii.gz") else final.suffix
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    return final.with_name(f".{stem}{_TMP_TAG}{os.getpid()}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_volume_nifti(scan: PhantomScan, final: Path) -> None:
    from radfm3d.io import save_nifti

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    image = _int16_image(scan)
    try:
        save_nifti(image, tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _int16_image(scan: PhantomScan) -> Any:
    import torch
    from monai.data import MetaTensor

    data = scan.array.astype(np.int16)[None]  # values are already integers in int16 range
    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(scan.affine, dtype=torch.float64))


def _uid(seed: int, index: int, kind: int) -> str:
    """Deterministic DICOM UID under the 2.25 (UUID-derived) root."""
    import hashlib

    digest = hashlib.sha256(f"radphantom:{seed}:{index}:{kind}".encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def _write_volume_dicom(scan: PhantomScan, final: Path, seed: int, index: int) -> None:
    from radfm3d.io import save_dicom_series

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    _remove(tmp)
    try:
        save_dicom_series(_int16_image(scan), tmp, modality=scan.modality, series_uid=_uid(seed, index, 1),
                          study_uid=_uid(seed, index, 0), patient_id=f"PHANTOM-{seed}-{index:06d}",
                          description=f"RadPhantom case {index}")
        _remove(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            _remove(tmp)


def _write_json_atomic(obj: Any, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, separators=(",", ":"))
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _run_config(seed: int, grid: Sequence[int] | None, dicom_fraction: float, prior_fraction: float,
                tasks: Sequence[str] | None, matrix: Sequence[int] = (96, 192), slices: Sequence[int] = (24, 64)
                ) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "grid": list(grid) if grid else None,
            "dicom_fraction": float(dicom_fraction), "prior_fraction": float(prior_fraction),
            "tasks": sorted(tasks) if tasks else None, "matrix": [int(v) for v in matrix],
            "slices": [int(v) for v in slices]}


def _case_done(out: Path, index: int, config: dict[str, Any]) -> bool:
    """A case is done when its sidecar exists, matches the run's settings and all its files exist."""
    sidecar = out / _case_paths(index)["sidecar"]
    if not sidecar.is_file():
        return False
    try:
        with open(sidecar, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("config") == config and all((out / f).exists() for f in meta.get("files", []))


def generate_case_files(out_dir: str | os.PathLike, seed: int, index: int, config: dict[str, Any]) -> dict[str, Any]:
    """Render case ``index`` and write its volume(s), DICOM copy and sidecar (sidecar last). Returns a status."""
    from radfm3d.data.phantom_tasks import build_records

    t0 = time.perf_counter()
    out = Path(out_dir)
    paths = _case_paths(index)
    scan, prior, gt = render_case(seed, index, grid=config["grid"], prior_fraction=config["prior_fraction"],
                                  dicom_fraction=config["dicom_fraction"], matrix=config["matrix"],
                                  slices=config["slices"])
    files = [paths["nifti"]]
    _write_volume_nifti(scan, out / paths["nifti"])
    image = paths["nifti"]
    if gt["dicom"]:
        _write_volume_dicom(scan, out / paths["dicom"], seed, index)
        files.append(paths["dicom"])
        image = paths["dicom"]  # the benchmark exercises the DICOM reader with these cases
    prior_path = None
    if prior is not None:
        _write_volume_nifti(prior, out / paths["prior"])
        files.append(paths["prior"])
        prior_path = paths["prior"]
    gt["images"] = {"image": image, "nifti": paths["nifti"], "dicom": paths["dicom"] if gt["dicom"] else None,
                    "prior": prior_path}
    records = build_records(gt, [image], prior_path, rng=np.random.default_rng([seed, index, _S_TEXT]),
                            tasks=config["tasks"])
    _write_json_atomic({"config": config, "files": files, "ground_truth": gt, "records": records},
                       out / paths["sidecar"])
    return {"index": index, "split": gt["split"], "seconds": time.perf_counter() - t0,
            "volumes": 1 + (prior is not None)}


def _job(args: tuple[str, int, int, dict[str, Any]]) -> dict[str, Any]:
    out_dir, seed, index, config = args
    return generate_case_files(out_dir, seed, index, config)


def _cleanup_temporaries(out: Path) -> int:
    """Remove half-written temporary files/folders left by an interrupted run; returns how many."""
    removed = 0
    for top in ("images", "dicom", "meta"):
        root = out / top
        if not root.is_dir():
            continue
        stack = [root]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                for entry in it:
                    if entry.name.startswith(".") and _TMP_TAG in entry.name:
                        _remove(Path(entry.path))
                        removed += 1
                    elif entry.is_dir(follow_symlinks=False) and not entry.name.startswith("case-"):
                        stack.append(Path(entry.path))
    for entry in out.glob(f".*{_TMP_TAG}*"):
        _remove(entry)
        removed += 1
    return removed


def generate_phantoms(out_dir: str | os.PathLike, n: int, seed: int = 0, *, workers: int = 1,
                      dicom_fraction: float = 0.1, prior_fraction: float = 0.25,
                      grid: Sequence[int] | None = (128, 128, 32), tasks: Sequence[str] | None = None,
                      matrix: Sequence[int] = (96, 192), slices: Sequence[int] = (24, 64),
                      progress: bool = True) -> dict[str, Any]:
    """Generate (or resume) a RadPhantom set of ``n`` cases under ``out_dir``; see the module docstring.

    Args:
        workers: parallel processes (1 = in this process).
        dicom_fraction: fraction of cases also written as a DICOM series (their manifests point to the series).
        prior_fraction: fraction of cases with a prior scan (comparison tasks).
        grid: model grid of the default PreprocessingRecipe for the 0-99 text boxes.
        tasks: subset of ``radfm3d.data.phantom_tasks.TASKS`` (default all).
        matrix, slices: (min, max) in-plane matrix and slice count (see :func:`render_case`).

    Returns:
        summary dict: n, seed, generated, skipped, volumes, seconds, volumes_per_minute, cases per split,
        records per split, manifest paths.
    """
    from radfm3d.data.manifest import ManifestWriter
    from radfm3d.data.phantom_tasks import TASKS

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if tasks is not None and set(tasks) - set(TASKS):
        raise ValueError(f"unknown task(s) {sorted(set(tasks) - set(TASKS))}; known: {', '.join(TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _run_config(seed, grid, dicom_fraction, prior_fraction, tasks, matrix, slices)
    cleaned = _cleanup_temporaries(out)
    todo = [i for i in range(n) if not _case_done(out, i, config)]
    t0 = time.perf_counter()
    volumes = 0
    bar = progress_bar(len(todo), progress, desc="phantoms", unit="case")
    jobs = [(str(out), int(seed), i, config) for i in todo]
    if workers <= 1 or len(todo) <= 1:
        for job in jobs:
            volumes += _job(job)["volumes"]
            bar.update(1)
    else:
        import multiprocessing as mp

        import importlib

        # import the heavy modules (torch/monai via io and transforms) once here, so forked workers share them
        for module in ("radfm3d.io", "radfm3d.transforms"):
            importlib.import_module(module)

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for status in pool.map(_job, jobs, chunksize=max(1, min(8, len(jobs) // (4 * workers)))):
                volumes += status["volumes"]
                bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0

    # assemble the manifests from the sidecars, streaming (in case order; scales to 100k+ cases)
    writers = {name: ManifestWriter(out / f"{name}.jsonl") for name, _ in SPLITS}
    writers["cases"] = ManifestWriter(out / "cases.jsonl", validate=False)
    split_counts = {name: 0 for name, _ in SPLITS}
    try:
        for i in range(n):
            with open(out / _case_paths(i)["sidecar"], encoding="utf-8") as fh:
                meta = json.load(fh)
            gt = meta["ground_truth"]
            split_counts[gt["split"]] += 1
            for rec in meta["records"]:
                writers[gt["split"]].write(rec)
            writers["cases"].write({"id": gt["case_id"], **gt})
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    manifests = {name: str(w.close()) for name, w in writers.items()}
    records_per_split = {name: writers[name].count for name, _ in SPLITS}
    if grid is not None:
        from radfm3d.transforms import PreprocessingRecipe

        PreprocessingRecipe(spatial_size=tuple(grid)).save(out)
    summary = {
        "n": n, "seed": int(seed), "out_dir": str(out), "config": config, "generated": len(todo),
        "skipped": n - len(todo), "removed_temporaries": cleaned, "volumes": volumes,
        "seconds": round(seconds, 3), "workers": workers,
        "volumes_per_minute": round(60.0 * volumes / seconds, 1) if volumes and seconds > 0 else None,
        "cases_per_split": split_counts, "records_per_split": records_per_split,
        "manifests": manifests,
    }
    _write_json_atomic(summary, out / "dataset.json")
    return summary


def _grid_arg(text: str) -> tuple[int, int, int] | None:
    if text.lower() in ("none", "off", ""):
        return None
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--grid needs three positive ints like 128,128,32, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _pair_arg(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"expected min,max with 1 <= min <= max, got {text!r}")
    return parts[0], parts[1]


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d phantoms --n N --out DIR --seed S --workers W --dicom-fraction 0.1 [--grid 128,128,32]``."""
    parser = argparse.ArgumentParser(prog="radfm3d phantoms", description="Generate the RadPhantom benchmark: "
                                     "synthetic CT/MRI volumes with known findings + task manifests (resumable).")
    parser.add_argument("--n", type=int, required=True, help="number of cases")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (fixes volumes, texts and splits)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="parallel processes")
    parser.add_argument("--dicom-fraction", type=float, default=0.1, help="fraction also written as DICOM series")
    parser.add_argument("--prior-fraction", type=float, default=0.25, help="fraction with a prior scan")
    parser.add_argument("--grid", type=_grid_arg, default=(128, 128, 32),
                        help="model grid for the 0-99 boxes (default 128,128,32; 'none' to skip boxes)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of tasks (default all)")
    parser.add_argument("--matrix", type=_pair_arg, default=(96, 192), help="min,max in-plane matrix (default 96,192)")
    parser.add_argument("--slices", type=_pair_arg, default=(24, 64), help="min,max number of slices (default 24,64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not 0.0 <= args.dicom_fraction <= 1.0 or not 0.0 <= args.prior_fraction <= 1.0:
        parser.error("--dicom-fraction and --prior-fraction must be in [0, 1]")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        summary = generate_phantoms(args.out, args.n, args.seed, workers=args.workers,
                                    dicom_fraction=args.dicom_fraction, prior_fraction=args.prior_fraction,
                                    grid=args.grid, tasks=tasks, matrix=args.matrix, slices=args.slices,
                                    progress=not args.no_progress)
    except ValueError as exc:
        print(f"radfm3d phantoms: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("n", "generated", "skipped", "volumes", "seconds",
                                              "volumes_per_minute", "cases_per_split", "records_per_split")}))
    return 0
