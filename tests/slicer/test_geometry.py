# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d.slicer.geometry`` with numpy inputs: KJI <-> IJK, the NRRD writer read back by radfm3d's reader, ROI
parameters from box corners, finding names."""

from __future__ import annotations

import numpy as np
import pytest

from radfm3d.io import load_image
from radfm3d.slicer.geometry import box_label, kji_to_model_array, model_array_to_kji, roi_parameters, write_nrrd
from tests.conftest import make_synthetic_volume


def test_kji_roundtrip_and_the_nrrd_reads_back_identically(tmp_path):
    vol = make_synthetic_volume(rotation_deg=25.0)
    kji = model_array_to_kji(vol.array)
    assert kji.shape == vol.array.shape[::-1] and kji[vol.marked_ijk[::-1]] == 3000
    array, affine = kji_to_model_array(kji, vol.affine)
    np.testing.assert_array_equal(array, vol.array)
    for compress in (True, False):
        path = write_nrrd(tmp_path / f"v{int(compress)}.nrrd", kji, vol.affine, compress=compress)
        image = load_image(path)
        np.testing.assert_array_equal(np.asarray(image[0]), vol.array.astype(np.float32))
        np.testing.assert_allclose(np.asarray(image.affine), vol.affine, atol=1e-9)
    with pytest.raises(ValueError, match="singular"):
        kji_to_model_array(kji, np.zeros((4, 4)))


def test_roi_parameters_recover_an_oblique_box():
    theta = np.deg2rad(30.0)
    axes = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]])
    centre, size = np.array([10.0, -20.0, 5.0]), np.array([8.0, 4.0, 2.0])
    corners = np.array([centre + axes @ ((np.array(bits) - 0.5) * size) for bits in np.ndindex(2, 2, 2)])
    p = roi_parameters({"corners_world_mm": corners.tolist(), "axes_world": axes.tolist()})
    np.testing.assert_allclose(p["center"], centre, atol=1e-9)
    np.testing.assert_allclose(p["size"], size, atol=1e-9)
    np.testing.assert_allclose(p["orientation"], axes, atol=1e-9)
    flipped = axes * np.array([1.0, 1.0, -1.0])  # a left-handed grid frame: same box, right-handed ROI frame
    q = roi_parameters({"corners_world_mm": corners.tolist(), "axes_world": flipped.tolist()})
    assert np.linalg.det(np.asarray(q["orientation"])) > 0
    np.testing.assert_allclose(q["size"], size, atol=1e-9)


def test_box_label():
    text = "Findings: a mass in the liver <box>1,2,3,4,5,6</box>. Left kidney cyst <box>1,1,1,2,2,2</box>"
    assert box_label(text, 0) == "mass in the liver"
    assert box_label(text, 1) == "Left kidney cyst"
    assert box_label("<box>1,2,3,4,5,6</box>", 0) == "finding 1"
    assert box_label(text, 5) == "finding 6"
