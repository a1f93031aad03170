# Copyright (c) radfm3d contributors. Apache-2.0.
"""Anatomical slice figures: axial, coronal and sagittal planes cut in world RAS mm, as a radiology viewer shows them.

The planes are sampled from the volume through its voxel -> RAS affine, so they are true anatomical planes whatever
the acquisition (axial = constant S, coronal = constant A, sagittal = constant R), also for sagittal, coronal,
flipped or oblique series. Display follows the radiological convention:

- axial: viewed from the feet; patient right on the image left, anterior at the top;
- coronal: viewed from the front; patient right on the image left, superior at the top;
- sagittal: viewed from the patient's left; anterior on the image left, superior at the top.

Edge markers (R/L, A/P, S/I) name the patient direction at each image edge. Boxes are ``[x1, y1, z1, x2, y2, z2]``
in world RAS mm, drawn in every plane they cross (solid) or project onto (dashed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PLANES", "SlicePlane", "anatomical_slices", "boxes_voxel_to_world", "draw_slice_plane"]

#: name -> (normal world axis, horizontal world axis, vertical world axis); world axes 0 = R, 1 = A, 2 = S
PLANES: dict[str, tuple[int, int, int]] = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}
_POSITIVE, _NEGATIVE = "RAS", "LPI"


@dataclass
class SlicePlane:
    """One anatomical plane sampled on a regular world grid.

    ``image`` (V, H) float32, row r at world ``v_mm[r]`` along ``v_axis``, column c at ``h_mm[c]`` along ``h_axis``
    (both ascending, mm); NaN outside the volume. ``position_mm`` is the plane's world coordinate along ``normal``.
    """

    name: str
    normal: int
    h_axis: int
    v_axis: int
    position_mm: float
    h_mm: np.ndarray
    v_mm: np.ndarray
    image: np.ndarray

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(h_low, h_high, v_low, v_high) pixel edges in mm, for ``imshow(extent=..., origin="lower")``."""
        dh = float(self.h_mm[1] - self.h_mm[0]) if len(self.h_mm) > 1 else 1.0
        dv = float(self.v_mm[1] - self.v_mm[0]) if len(self.v_mm) > 1 else 1.0
        return (float(self.h_mm[0]) - dh / 2, float(self.h_mm[-1]) + dh / 2,
                float(self.v_mm[0]) - dv / 2, float(self.v_mm[-1]) + dv / 2)

    @property
    def markers(self) -> dict[str, str]:
        """Patient direction at each displayed edge: {"left", "right", "top", "bottom"} -> R/L/A/P/S/I."""
        return {"left": _POSITIVE[self.h_axis], "right": _NEGATIVE[self.h_axis],
                "top": _POSITIVE[self.v_axis], "bottom": _NEGATIVE[self.v_axis]}


def _world_corners(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(8, 3) world mm of the volume's outer voxel edges."""
    edges = [(-0.5, n - 0.5) for n in shape[:3]]
    idx = np.array([[a, b, c, 1.0] for a in edges[0] for b in edges[1] for c in edges[2]])
    return (affine @ idx.T).T[:, :3]


def boxes_voxel_to_world(boxes_voxel: Sequence[Sequence[float]], affine: np.ndarray) -> np.ndarray:
    """(N, 6) voxel-coordinate boxes -> (N, 6) world RAS mm boxes (the axis-aligned hull of each box's 8 corners)."""
    boxes = np.asarray(boxes_voxel, dtype=np.float64).reshape(-1, 6)
    out = np.zeros_like(boxes)
    for i, b in enumerate(boxes):
        corners = np.array([[x, y, z, 1.0] for x in (b[0], b[3]) for y in (b[1], b[4]) for z in (b[2], b[5])])
        world = (np.asarray(affine, dtype=np.float64) @ corners.T).T[:, :3]
        out[i] = [*world.min(0), *world.max(0)]
    return out


def anatomical_slices(volume: Any, affine: Any, centre_mm: Sequence[float] | None = None,
                      max_pixels: int = 512, order: int = 1) -> list[SlicePlane]:
    """Axial, coronal and sagittal planes through ``centre_mm`` (world RAS mm; default: the volume's centre).

    volume: (X, Y, Z) or (C, X, Y, Z) (channel 0 is used); affine: 4x4 voxel -> world RAS mm. Each plane is sampled
    (``scipy.ndimage.map_coordinates``, linear by default) on a world grid covering the volume's extent at the
    finest voxel spacing, coarsened so that no side exceeds ``max_pixels``.
    """
    from scipy.ndimage import map_coordinates

    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 4:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"anatomical_slices needs a 3D volume, got shape {vol.shape}")
    affine = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    inverse = np.linalg.inv(affine)
    corners = _world_corners(affine, vol.shape)
    lo, hi = corners.min(0), corners.max(0)
    centre = (lo + hi) / 2 if centre_mm is None else np.asarray(centre_mm, dtype=np.float64).reshape(3)
    spacing = float(np.sqrt((affine[:3, :3] ** 2).sum(0)).min())
    planes = []
    for name, (normal, h_axis, v_axis) in PLANES.items():
        axes_mm = []
        for axis in (h_axis, v_axis):
            step = max(spacing, (hi[axis] - lo[axis]) / max_pixels)
            n = max(1, int(np.floor((hi[axis] - lo[axis]) / step)))
            axes_mm.append(lo[axis] + (np.arange(n) + 0.5) * (hi[axis] - lo[axis]) / n)
        h_mm, v_mm = axes_mm
        hh, vv = np.meshgrid(h_mm, v_mm)  # (V, H)
        world = np.zeros((4, hh.size))
        world[h_axis], world[v_axis], world[normal], world[3] = hh.ravel(), vv.ravel(), centre[normal], 1.0
        ijk = (inverse @ world)[:3]
        # voxels are cells: a point within half a voxel of the outermost centres shows the edge value (as a viewer
        # does), points beyond are NaN (drawn black)
        inside = np.all((ijk >= -0.5) & (ijk <= np.array(vol.shape)[:, None] - 0.5), axis=0)
        image = map_coordinates(vol, ijk, order=order, mode="nearest", prefilter=False)
        image = np.where(inside, image, np.nan).astype(np.float32)
        planes.append(SlicePlane(name, normal, h_axis, v_axis, float(centre[normal]), h_mm, v_mm,
                                 image.reshape(hh.shape)))
    return planes


def draw_slice_plane(ax: Any, plane: SlicePlane, boxes_world_mm: Sequence[Sequence[float]] = (),
                     colors: Sequence[str] | str = "red", vmin: float | None = None, vmax: float | None = None,
                     title: str | None = None, linewidth: float = 1.5) -> None:
    """Show ``plane`` on a matplotlib axis in the radiological convention (see the module docstring), with edge
    markers and ``boxes_world_mm`` (N, 6) drawn solid where they cross the plane and dashed where they do not."""
    from matplotlib.patches import Rectangle

    cmap = _gray()
    ax.imshow(np.ma.masked_invalid(plane.image), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower",
              extent=plane.extent, interpolation="nearest", aspect="equal")
    h_lo, h_hi, v_lo, v_hi = plane.extent
    ax.set_xlim(h_hi, h_lo)  # the positive direction (R, or A for sagittal) on the image left
    ax.set_ylim(v_lo, v_hi)  # the positive direction (A or S) at the top
    colors = [colors] * len(boxes_world_mm) if isinstance(colors, str) else list(colors)
    for box, color in zip(boxes_world_mm, colors):
        b = np.asarray(box, dtype=np.float64).reshape(6)
        crosses = min(b[plane.normal], b[plane.normal + 3]) <= plane.position_mm <= max(b[plane.normal],
                                                                                          b[plane.normal + 3])
        h0, h1 = sorted((b[plane.h_axis], b[plane.h_axis + 3]))
        v0, v1 = sorted((b[plane.v_axis], b[plane.v_axis + 3]))
        ax.add_patch(Rectangle((h0, v0), h1 - h0, v1 - v0, fill=False, edgecolor=color, linewidth=linewidth,
                               linestyle="-" if crosses else "--"))
    style = dict(color="yellow", fontsize=9, fontweight="bold", transform=ax.transAxes)
    m = plane.markers
    ax.text(0.02, 0.5, m["left"], ha="left", va="center", **style)
    ax.text(0.98, 0.5, m["right"], ha="right", va="center", **style)
    ax.text(0.5, 0.98, m["top"], ha="center", va="top", **style)
    ax.text(0.5, 0.02, m["bottom"], ha="center", va="bottom", **style)
    axis_name = "RAS"[plane.normal]
    ax.set_title(title if title is not None else f"{plane.name} ({axis_name} = {plane.position_mm:.1f} mm)",
                 fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _gray() -> Any:
    import matplotlib

    return matplotlib.colormaps["gray"].with_extremes(bad="black")
