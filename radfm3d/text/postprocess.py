# Copyright (c) radfm3d contributors. Apache-2.0.
"""Post-processing of generated text: ``<box>`` boxes -> model grid -> original voxel indices and world mm (RAS).

The mapping goes through the :class:`~radfm3d.transforms.GridGeometry` recorded when the image was
preprocessed (``processor(...)["grid_geometry"]``), so a box lands on the scan the user gave, whatever its
orientation, spacing or file format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from radfm3d.text.boxes import normalised_to_grid_box, parse_boxes

__all__ = ["boxes_from_text", "as_grid_geometry"]


def as_grid_geometry(geometry: Any, image_index: int = 0) -> Any:
    """A ``GridGeometry`` from a ``GridGeometry``, its ``to_dict()`` dict, or a per-sample list of those
    (the processor's ``grid_geometry[b]``; ``image_index`` picks the image)."""
    from radfm3d.transforms import GridGeometry

    if isinstance(geometry, GridGeometry):
        return geometry
    if isinstance(geometry, Mapping):
        return GridGeometry.from_dict(geometry)
    if isinstance(geometry, Sequence) and not isinstance(geometry, (str, bytes)):
        if not geometry:
            raise ValueError("empty grid_geometry list: the sample has no image to place boxes on")
        if not -len(geometry) <= image_index < len(geometry):
            raise ValueError(f"image_index {image_index} out of range for {len(geometry)} image geometries")
        return as_grid_geometry(geometry[image_index])
    raise TypeError(f"grid_geometry must be a GridGeometry, a dict or a list of them, got {type(geometry).__name__}")


def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def boxes_from_text(text: str, grid_geometry: Any, image_index: int = 0) -> list[dict[str, Any]]:
    """Every well-formed ``<box>`` in ``text`` placed on the scan, in order of appearance.

    Each item: ``box_0_99`` (6 ints), ``box_grid`` (continuous grid indices, voxel centres at integers),
    ``box_voxel`` (continuous indices of the original file, as stored), ``box_world_mm`` (RAS mm, axis-aligned
    bounding box), ``centre_grid`` / ``centre_voxel`` / ``centre_world_mm`` (3 floats) and ``size_mm``
    (world extent per RAS axis). Boxes are ``(lo0, lo1, lo2, hi0, hi1, hi2)``.
    """
    boxes = parse_boxes(text)
    if not boxes:
        return []
    geometry = as_grid_geometry(grid_geometry, image_index)
    out = []
    for box in boxes:
        grid = np.asarray(normalised_to_grid_box(box, geometry.spatial_size), dtype=np.float64)
        centre_grid = (grid[:3] + grid[3:]) / 2.0
        world = np.asarray(geometry.box_grid_to_world(grid), dtype=np.float64)
        out.append({
            "box_0_99": [int(v) for v in box],
            "box_grid": _floats(grid),
            "box_voxel": _floats(geometry.box_grid_to_voxel(grid)),
            "box_world_mm": _floats(world),
            "centre_grid": _floats(centre_grid),
            "centre_voxel": _floats(geometry.grid_to_voxel(centre_grid)),
            "centre_world_mm": _floats(geometry.grid_to_world(centre_grid)),
            "size_mm": _floats(world[3:] - world[:3]),
        })
    return out
