# Copyright (c) radfm3d contributors. Apache-2.0.
"""Boxes in generated text -> model grid -> original voxel indices and world mm, through a known geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radfm3d.text.boxes import format_box, grid_box_to_normalised
from radfm3d.text.postprocess import as_grid_geometry, boxes_from_text
from radfm3d.transforms import GridGeometry, PreprocessingRecipe, compute_grid_geometry


def _known_geometry() -> GridGeometry:
    """Grid 100x50x10 with 2 x 3 x 5 mm steps, origin (-100, 20, -30) mm; the original file is stored LPS-like
    (axis 0 towards Left, 1 towards Posterior) at 1 mm, 1 mm, 5 mm."""
    grid_affine = np.array([[2.0, 0, 0, -100.0], [0, 3.0, 0, 20.0], [0, 0, 5.0, -30.0], [0, 0, 0, 1]])
    original_affine = np.array([[-1.0, 0, 0, 98.5], [0, -1.0, 0, 168.0], [0, 0, 5.0, -30.0], [0, 0, 0, 1]])
    return GridGeometry(grid_affine, original_affine, (200, 150, 10), (100, 50, 10))


def test_known_grid_box_maps_to_the_right_world_and_voxel_box():
    geom = _known_geometry()
    text = "Finding: <box>0,0,0,99,99,99</box> and <box>bad</box> then <box>99,0,99,0,99,0</box>"
    items = boxes_from_text(text, geom)
    assert len(items) == 2  # the malformed box is skipped; the swapped one is ordered
    whole = items[0]
    assert whole["box_0_99"] == [0, 0, 0, 99, 99, 99] == items[1]["box_0_99"]
    # grid spans [-0.5, n - 0.5] -> world: origin - step/2 .. origin + (n - 0.5) step
    np.testing.assert_allclose(whole["box_grid"], [-0.5, -0.5, -0.5, 99.5, 49.5, 9.5])
    np.testing.assert_allclose(whole["box_world_mm"], [-101.0, 18.5, -32.5, 99.0, 168.5, 17.5])
    np.testing.assert_allclose(whole["centre_world_mm"], [-1.0, 93.5, -7.5])
    np.testing.assert_allclose(whole["size_mm"], [200.0, 150.0, 50.0])
    # original voxels: x = 98.5 - i, y = 168 - j -> the grid covers voxel extents [-0.5, 199.5] x [-0.5, 149.5]
    np.testing.assert_allclose(whole["box_voxel"], [-0.5, -0.5, -0.5, 199.5, 149.5, 9.5])
    np.testing.assert_allclose(whole["centre_voxel"], [99.5, 74.5, 4.5])


def test_round_trip_from_world_box_through_text():
    geom = _known_geometry()
    world = np.array([-40.0, 50.0, -10.0, -20.0, 80.0, 5.0])  # a 20 x 30 x 15 mm lesion
    box_grid = geom.box_world_to_grid(world)
    text = "The lesion is at " + format_box(grid_box_to_normalised(box_grid, geom.spatial_size)) + "."
    (item,) = boxes_from_text(text, geom.to_dict())
    step_mm = np.array([100 * 2.0, 50 * 3.0, 10 * 5.0] * 2) / 99.0
    assert np.all(np.abs(np.asarray(item["box_world_mm"]) - world) <= 0.5 * step_mm + 1e-6)
    centre = (world[:3] + world[3:]) / 2
    assert np.all(np.abs(np.asarray(item["centre_world_mm"]) - centre) <= 0.5 * step_mm[:3] + 1e-6)


def test_geometry_from_preprocessing_an_oblique_scan(synthetic_volume):
    """A rotated scan (20 deg in-plane): the world box of a text box agrees with the grid affine directly."""
    recipe = PreprocessingRecipe(spatial_size=(32, 32, 16))
    geom = compute_grid_geometry(synthetic_volume.affine, synthetic_volume.array.shape, recipe)
    marked = geom.world_to_grid(synthetic_volume.marked_world)
    box = np.concatenate([marked - 1.5, marked + 1.5])
    (item,) = boxes_from_text(format_box(grid_box_to_normalised(box, geom.spatial_size)), [geom.to_dict()])
    centre_voxel = np.asarray(item["centre_voxel"])
    assert np.linalg.norm(centre_voxel - np.asarray(synthetic_volume.marked_ijk)) < 2.0
    np.testing.assert_allclose(item["centre_world_mm"], geom.grid_to_world(np.asarray(item["centre_grid"])))


def test_no_boxes_and_geometry_forms():
    geom = _known_geometry()
    assert boxes_from_text("No abnormality.", None) == []  # no geometry needed when there is no box
    assert as_grid_geometry(geom) is geom
    assert isinstance(as_grid_geometry([geom.to_dict(), geom.to_dict()], 1), GridGeometry)
    with pytest.raises(ValueError):
        as_grid_geometry([])
    with pytest.raises(TypeError):
        as_grid_geometry(torch.zeros(3))
