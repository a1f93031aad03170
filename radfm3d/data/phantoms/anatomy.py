# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadPhantom anatomy and findings tables: the vocabulary of the synthetic benchmark and its shapes.

Coordinates are world patient coordinates, **RAS+ mm** (+x = patient Right, +y = Anterior, +z = Superior).
An organ is an :class:`Ellipsoid` placed by :data:`ANATOMY` as fractions of the body half-extent; findings are
ellipsoids of a :data:`FINDING_TYPES` type inside a host organ listed in :data:`FINDING_SITES`. ``organ`` +
``side`` identify a structure; :func:`organ_label` names it in texts.

Only the phantom generator (``radfm3d.data.phantoms``) and the phantom label schema use these tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "GENERATOR_VERSION", "REGIONS", "FINDING_TYPES", "ORGANS", "SIDES", "CHANGES", "SPLITS", "TISSUES",
    "FINDING_SITES", "REGION_FINDING_ORGANS", "FINDING_SIZE_MM", "ANATOMY", "Ellipsoid", "organ_label",
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
ANATOMY: dict[str, list[tuple[str, str, str, str, tuple[float, float, float], tuple[float, float, float]]]] = {
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
#: the same table under the name ``radfm3d.data.structured_labels`` imports
_ANATOMY = ANATOMY
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
