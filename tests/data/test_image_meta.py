# Copyright (c) radfm3d contributors. Apache-2.0.
"""Per-image corrections of a manifest record (image_series, image_meta) validated and applied after reading."""

from __future__ import annotations

import numpy as np
import pytest

from radfm3d.data.image_meta import apply_image_meta, check_image_fields, needs_record_loader
from radfm3d.errors import RadFM3DInputError
from radfm3d.io import load_image


@pytest.mark.parametrize("record, expected", [
    ({"images": ["a"], "image_series": ["1.2.3"]}, []),
    ({"images": ["a", "b"], "image_series": ["1.2.3"]}, ["'image_series' must be a list of 2"]),
    ({"images": ["a"], "image_meta": [{"spacing_mm": [1, 1, 0]}]}, ["spacing_mm must be positive"]),
    ({"images": ["a"], "image_meta": [{"hu_rescale": [1, float("nan")]}]}, ["must be 2 finite numbers"]),
    ({"images": ["a"], "image_meta": [{"spacing": [1, 1, 1]}]}, ["unknown key 'spacing'"]),
    ({"images": ["a"], "image_meta": [None]}, []),
])
def test_check_image_fields(record, expected):
    problems = check_image_fields(record)
    assert len(problems) == len(expected) and all(e in p for e, p in zip(expected, problems))


def test_apply_image_meta_rescales_values_and_spacing():
    image = load_image(np.full((1, 4, 4, 2), 10.0, dtype=np.float32), affine=np.diag([2.0, -2.0, 3.0, 1.0]))
    apply_image_meta(image, {"spacing_mm": [0.5, 0.5, 1.0], "hu_rescale": [2.0, -1000.0]}, "scan.nii.gz")
    np.testing.assert_allclose(np.asarray(image.affine)[:3, :3], np.diag([0.5, -0.5, 1.0]))
    assert float(image.max()) == -980.0
    with pytest.raises(RadFM3DInputError, match="scan.nii.gz: values are not finite"):
        apply_image_meta(image, {"hu_rescale": [1e308, 1e308]}, "scan.nii.gz")
    assert needs_record_loader({"image_meta": [None], "image_series": ["x"]})
    assert not needs_record_loader({"images": ["a"]})


def test_training_reader_applies_record_corrections(tmp_path):
    """engine.data reads a record's images with image_meta applied (with and without a preprocessed-image cache)."""
    from radfm3d.data.cache import PreprocessedImageCache
    from radfm3d.engine.data import _images
    from radfm3d.transforms import PreprocessingRecipe

    array = np.linspace(0, 1, 2 * 4 * 6 * 5, dtype=np.float32).reshape(2, 4, 6, 5)[:1]  # (C, D, H, W)
    np.save(tmp_path / "scan.npy", array)
    record = {"images": [str(tmp_path / "scan.npy")], "image_meta": [{"array_axes": "CZYX"}]}
    (image,), preprocessed = _images(record, None)
    assert not preprocessed and tuple(image.shape) == (1, 5, 6, 4)
    np.testing.assert_allclose(np.asarray(image[0, :, :, 0]), array[0, 0].T)
    recipe = PreprocessingRecipe(spatial_size=(8, 8, 4))
    (tensor,), preprocessed = _images(record, PreprocessedImageCache(tmp_path / "cache", recipe))
    assert preprocessed and tuple(tensor.shape) == (recipe.num_channels, 8, 8, 4)
    plain, preprocessed = _images({"images": ["a.nii.gz"]}, None)
    assert plain == ["a.nii.gz"] and not preprocessed
