# Copyright (c) radfm3d contributors. Apache-2.0.
"""Anatomical slice figures: planes are cut in world RAS mm from the affine (not along voxel axes), shown in the
radiological convention with edge markers, boxes where they belong."""

from __future__ import annotations

import numpy as np
import pytest

from radfm3d.evaluation.figures import anatomical_slices, boxes_voxel_to_world, draw_slice_plane

# a sagittally acquired series: voxel axis 0 runs inferior (rows down), axis 1 anterior, axis 2 (slices) right
SAGITTAL = np.array([[0.0, 0.0, 3.0, -20.0],
                     [0.0, 1.5, 0.0, -30.0],
                     [-1.2, 0.0, 0.0, 40.0],
                     [0.0, 0.0, 0.0, 1.0]])


def _oblique() -> np.ndarray:
    """Axial slices rotated 20 degrees about S and tilted 10 degrees about R (an oblique acquisition)."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = about_r @ about_s @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (-12.5, 30.25, -40.0)
    return affine


def _linear_volume(affine: np.ndarray, shape=(40, 30, 10)) -> np.ndarray:
    """Voxel values = x + 10 y + 100 z of the voxel centre (world RAS mm): linear interpolation reproduces it."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (world @ np.array([1.0, 10.0, 100.0])).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("affine", [SAGITTAL, _oblique()], ids=["sagittal-acquisition", "oblique"])
def test_planes_are_constant_s_a_r_whatever_the_voxel_axes(affine):
    shape = (40, 30, 10)
    vol = _linear_volume(affine, shape)
    centre = affine[:3, :3] @ (np.array(shape) / 2 - 0.5) + affine[:3, 3]
    planes = {p.name: p for p in anatomical_slices(vol, affine, centre)}
    assert {name: (p.normal, p.h_axis, p.v_axis) for name, p in planes.items()} == {
        "axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}
    weights = np.array([1.0, 10.0, 100.0])
    inverse = np.linalg.inv(affine)
    for name, plane in planes.items():
        assert plane.position_mm == pytest.approx(centre[plane.normal])
        hh, vv = np.meshgrid(plane.h_mm, plane.v_mm)
        world = np.zeros((hh.size, 3))
        world[:, plane.h_axis], world[:, plane.v_axis], world[:, plane.normal] = hh.ravel(), vv.ravel(), centre[
            plane.normal]
        ijk = world @ inverse[:3, :3].T + inverse[:3, 3]
        interior = np.all((ijk >= 0) & (ijk <= np.array(shape) - 1), axis=1)
        assert interior.sum() > 50, name
        expected = world @ weights  # the pixel shows the voxel value at that world point of the plane
        assert np.allclose(plane.image.ravel()[interior], expected[interior], atol=1e-2), name
        outside = ~np.all((ijk >= -0.5) & (ijk <= np.array(shape) - 0.5), axis=1)
        assert np.isnan(plane.image.ravel()[outside]).all(), name
        if name == "axial":  # a constant-S plane: its pixels minus the in-plane part are 100 * S everywhere
            rest = plane.image.ravel() - hh.ravel() - 10 * vv.ravel()
            assert np.allclose(rest[interior], 100 * centre[2], atol=1e-2)


def test_voxel_axis_cut_would_not_be_axial():
    """The old figure's 'axial' panel vol[:, :, k] of the sagittal series is a constant-R plane: it varies with S."""
    vol = _linear_volume(SAGITTAL)
    assert np.ptp(vol[:, :, 5]) > 1000  # voxel-axis cut spans S
    axial = next(p for p in anatomical_slices(vol, SAGITTAL) if p.name == "axial")
    hh, vv = np.meshgrid(axial.h_mm, axial.v_mm)
    rest = axial.image - hh - 10 * vv
    assert np.nanmax(rest) - np.nanmin(rest) < 5.0  # the anatomical one does not (edge half-voxels aside)


def test_radiological_display_markers_and_boxes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vol = _linear_volume(SAGITTAL)
    box = np.array([-10.0, -20.0, 5.0, 0.0, -5.0, 20.0])  # world RAS mm
    planes = anatomical_slices(vol, SAGITTAL, (box[:3] + box[3:]) / 2)
    fig, axes = plt.subplots(1, 3)
    try:
        for ax, plane in zip(axes, planes):
            far = box + np.r_[0, 0, 0, 0, 0, 0]
            far[plane.normal], far[plane.normal + 3] = 500.0, 510.0  # does not cross this plane
            draw_slice_plane(ax, plane, [box, far])
            xlim, ylim = ax.get_xlim(), ax.get_ylim()
            assert xlim[0] > xlim[1], plane.name  # R (or A) on the image left: radiological convention
            assert ylim[0] < ylim[1], plane.name  # A (or S) at the top
            texts = {t.get_text() for t in ax.texts}
            expected = {"axial": {"R", "L", "A", "P"}, "coronal": {"R", "L", "S", "I"},
                        "sagittal": {"A", "P", "S", "I"}}[plane.name]
            assert texts == expected, plane.name
            crossing, projected = ax.patches
            assert crossing.get_xy() == pytest.approx((box[plane.h_axis], box[plane.v_axis]))
            assert crossing.get_width() == pytest.approx(box[plane.h_axis + 3] - box[plane.h_axis])
            assert crossing.get_height() == pytest.approx(box[plane.v_axis + 3] - box[plane.v_axis])
            assert crossing.get_linestyle() == "-" and projected.get_linestyle() == "--"
        assert planes[0].markers == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
        assert planes[2].markers == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    finally:
        plt.close(fig)


def test_boxes_voxel_to_world_and_png_of_a_sagittal_series(tmp_path):
    from monai.data import MetaTensor

    from radfm3d.inference import draw_boxes_png

    world = boxes_voxel_to_world([[10, 5, 2, 20, 15, 6]], SAGITTAL)[0]
    assert world.tolist() == pytest.approx([2 * 3 - 20, 5 * 1.5 - 30, 40 - 20 * 1.2,
                                            6 * 3 - 20, 15 * 1.5 - 30, 40 - 10 * 1.2])
    image = MetaTensor(np.random.default_rng(0).normal(size=(1, 40, 30, 10)).astype(np.float32),
                       affine=SAGITTAL)
    png = draw_boxes_png(image, [[10, 5, 2, 20, 15, 6]], tmp_path / "sag.png", title="sagittal series")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sag.png"]
