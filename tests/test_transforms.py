# Copyright (c) radfm3d contributors. Apache-2.0.
"""Preprocessing: recipe serialisation, geometry (orientation-invariance, invertibility), intensity, transforms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import Orientation, Resize, SpatialResample

from radfm3d.transforms import (
    GridGeometry,
    LoadScand,
    ModalityIntensity,
    ModalityIntensityd,
    PreprocessingRecipe,
    ResampleToGrid,
    ResampleToGridd,
    compute_grid_geometry,
    preprocess,
    preprocessing_transforms,
)

SHAPE = (48, 40, 24)  # X (R), Y (A), Z (S) in RAS storage
SPACING = (1.0, 1.25, 2.5)
ORIGIN = (-20.0, 10.0, -30.0)
MARK = (12, 26, 6)  # first voxel of a 4x4x4 cube of 3000 HU (the marked spot), away from the L-shaped blob
MARK_CENTRE = np.array(MARK) + 1.5
GRID = (24, 20, 12)  # exactly 2x coarser on every axis


def ras_affine() -> np.ndarray:
    aff = np.diag([*SPACING, 1.0])
    aff[:3, 3] = ORIGIN
    return aff


def phantom_hu() -> np.ndarray:
    """Integer HU volume (X, Y, Z): smooth background, an L-shaped 900 HU blob and a 3000 HU marked cube."""
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij")
    vol = -400 + 300 * np.sin(i / 9.0) * np.cos(j / 11.0) + 10 * k
    vol[28:34, 8:12, 14:18] = 900  # L: a bar along X ...
    vol[28:31, 12:20, 14:18] = 900  # ... and a leg along +Y at its low-X end
    vol[MARK[0]:MARK[0] + 4, MARK[1]:MARK[1] + 4, MARK[2]:MARK[2] + 4] = 3000
    return np.round(vol).astype(np.float32)


def smooth_volume() -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij")
    return (100 + 50 * np.sin(i / 8.0) + 40 * np.cos(j / 7.0) + 30 * np.sin(k / 5.0)).astype(np.float32)


def make_image(vol: np.ndarray, affine: np.ndarray, modality: str = "CT", **meta) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(vol))[None],
                      affine=torch.as_tensor(affine, dtype=torch.float64), meta={"modality": modality, **meta})


def reorder(vol: np.ndarray, affine: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]):
    """Store the same object with another voxel order: new axis k = old axis perm[k], then flip new axes.
    Returns (new_vol, new_affine, new_index_of(old_index))."""
    new = np.transpose(vol, perm)
    shape = new.shape
    new = np.flip(new, axis=[k for k in range(3) if flips[k]]) if any(flips) else new
    p = np.zeros((4, 4))  # new index -> old index
    p[3, 3] = 1
    for k, old in enumerate(perm):
        if flips[k]:
            p[old, k], p[old, 3] = -1.0, shape[k] - 1
        else:
            p[old, k] = 1.0

    def new_index(old_idx):
        return tuple(int(round(v)) for v in np.linalg.solve(p, [*old_idx, 1.0])[:3])

    return np.ascontiguousarray(new), affine @ p, new_index


def mark_on_grid(resampled_hu: torch.Tensor) -> np.ndarray:
    """Grid-index centroid of the marked cube (grid voxels above 1400 HU after resampling)."""
    return np.argwhere(resampled_hu[0].numpy() > 1400).mean(axis=0)


LPS_SAGITTAL = ((1, 2, 0), (True, True, True))  # axcodes P, I, L: sagittal slices (last axis L-R), L/P flipped


# ------------------------------------------------------------------------------------------ recipe
def test_recipe_json_round_trip(tmp_path: Path) -> None:
    for recipe in (PreprocessingRecipe(), PreprocessingRecipe.radfm(),
                   PreprocessingRecipe(fit="crop_or_pad", target_spacing=(1.5, 1.5, 3.0), axcodes="lps",
                                       ct_windows=[(50, 350)], background=-1000)):
        again = PreprocessingRecipe.from_json(recipe.to_json())
        assert again == recipe
        assert json.loads(recipe.to_json())["format"] == "radfm3d-preprocessing"
        path = recipe.save(tmp_path / "model")  # a folder -> folder/preprocessing.json
        assert path == tmp_path / "model" / "preprocessing.json"
        assert PreprocessingRecipe.load(tmp_path / "model") == recipe
        assert PreprocessingRecipe.load(recipe.save(tmp_path / "r.json")) == recipe
    assert PreprocessingRecipe(axcodes="lps").axcodes == "LPS"


@pytest.mark.parametrize("kwargs, words", [
    ({"spatial_size": (128, 0, 32)}, "spatial_size"),
    ({"spatial_size": (128, 128)}, "spatial_size"),
    ({"axcodes": "RAR"}, "axcodes"),
    ({"fit": "zoom"}, "fit"),
    ({"fit": "crop_or_pad"}, "target_spacing"),
    ({"target_spacing": (1, 1, 1)}, "crop_or_pad"),
    ({"ct_windows": [(40, 0)]}, "ct_windows"),
    ({"ct_windows": [(40, 400), (0, 100)]}, "num_channels"),
    ({"mr_percentiles": (99, 1)}, "mr_percentiles"),
    ({"interpolation": "cubic"}, "interpolation"),
    ({"intensity": "zscore"}, "intensity"),
    ({"depth_multiple": 100}, "depth_multiple"),
])
def test_recipe_validation_names_the_problem(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        PreprocessingRecipe(**kwargs)


def test_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        PreprocessingRecipe.load(tmp_path)
    bad = tmp_path / "preprocessing.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="preprocessing.json.*invalid JSON"):
        PreprocessingRecipe.load(tmp_path)
    data = PreprocessingRecipe().to_dict()
    data["spacing_mm"] = 2
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown recipe field.*spacing_mm"):
        PreprocessingRecipe.load(bad)


# ------------------------------------------------------------------------------------------ shapes / ranges
@pytest.mark.parametrize("modality, shape, is_2d, recipe, expected", [
    ("CT", SHAPE, False, PreprocessingRecipe(spatial_size=GRID), (3, *GRID)),
    ("MR", SHAPE, False, PreprocessingRecipe(spatial_size=GRID), (3, *GRID)),
    ("OT", SHAPE, False, PreprocessingRecipe(spatial_size=GRID, num_channels=1, ct_windows=[(40, 400)]), (1, *GRID)),
    ("CR", (60, 50, 1), True, PreprocessingRecipe(spatial_size=GRID), (3, 24, 20, 12)),
    ("CT", (37, 30, 37), False, PreprocessingRecipe.radfm(in_plane=32), (3, 32, 32, 36)),
    ("CT", (20, 20, 300), False, PreprocessingRecipe.radfm(in_plane=16), (3, 16, 16, 64)),
    ("MR", (20, 20, 3), False, PreprocessingRecipe.radfm(in_plane=16), (3, 16, 16, 4)),
    ("DX", (40, 30, 1), True, PreprocessingRecipe.radfm(), (3, 512, 512, 4)),
])
def test_output_shape_and_range(modality, shape, is_2d, recipe, expected) -> None:
    rng = np.random.default_rng(0)
    vol = (rng.normal(size=shape) * 300).astype(np.float32)
    out = preprocess(make_image(vol, np.diag([0.9, 1.1, 2.0, 1.0]), modality, is_2d=is_2d), recipe)
    assert tuple(out.shape) == expected and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 and float(out.max()) > 0.5
    assert GridGeometry.from_dict(out.meta["grid_geometry"]).spatial_size == expected[1:]
    assert np.allclose(out.affine.numpy(), out.meta["grid_geometry"]["grid_affine"])
    assert PreprocessingRecipe.from_json(out.meta["preprocessing_recipe"]) == recipe
    if recipe.intensity == "minmax" or modality != "CT":  # identical channels
        assert torch.equal(out[0], out[-1])
    if is_2d:  # the slice is replicated along depth
        assert torch.equal(out[..., 0], out[..., -1])


def test_hu_windows_exact() -> None:
    """Slabs of known HU along S; grid aligned with the slabs -> window values exactly."""
    hu = [-1350.0, -160.0, 40.0, 240.0, 400.0, 1000.0]
    vol = np.repeat(np.array(hu, np.float32)[None, None, :], 4, axis=0).repeat(4, axis=1)
    recipe = PreprocessingRecipe(spatial_size=(4, 4, 6), interpolation="nearest")
    out = preprocess(make_image(vol, np.eye(4), "CT"), recipe)
    expected = np.array([[np.clip((h - (lv - wd / 2)) / wd, 0, 1) for h in hu] for lv, wd in recipe.ct_windows])
    np.testing.assert_allclose(out[:, 1, 2, :].numpy(), expected, atol=1e-6)
    assert out[0, 0, 0, 2] == 0.5 and out[0, 0, 0, 1] == 0.0 and out[0, 0, 0, 3] == 1.0  # level, level -/+ width/2
    assert abs(float(out[1, 0, 0, 0]) - 0.0) < 1e-6 and abs(float(out[2, 0, 0, 4]) - 0.5) < 1e-6


def test_mr_percentiles_ignore_zero_background() -> None:
    vol = np.zeros(SHAPE, np.float32)
    vol[8:40, 8:32, 4:20] = np.linspace(100, 300, 32)[:, None, None]
    out = ModalityIntensity(PreprocessingRecipe(mr_percentiles=(0.0, 100.0)))(make_image(vol, np.eye(4), "MR"))
    assert json.loads(out.meta["intensity"])["range"] == [100.0, 300.0]  # zeros excluded
    assert float(out[0, 8, 8, 4]) == 0.0 and float(out[0, 39, 8, 4]) == 1.0 and float(out[0, 0, 0, 0]) == 0.0


# ------------------------------------------------------------------------------------------ geometry
def test_same_object_any_storage_order_gives_same_tensor_and_world_point() -> None:
    vol, aff = phantom_hu(), ras_affine()
    recipe = PreprocessingRecipe(spatial_size=GRID)
    ref = preprocess(make_image(vol, aff), recipe)
    ref_geo = GridGeometry.from_dict(ref.meta["grid_geometry"])
    mark_world = aff[:3, :3] @ MARK_CENTRE + aff[:3, 3]
    for perm, flips in [LPS_SAGITTAL, ((0, 1, 2), (True, False, True)), ((2, 0, 1), (True, True, False))]:
        new_vol, new_aff, new_index = reorder(vol, aff, perm, flips)
        assert new_vol[new_index(MARK)] == 3000
        out = preprocess(make_image(new_vol, new_aff), recipe)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)
        geo = GridGeometry.from_dict(out.meta["grid_geometry"])
        np.testing.assert_allclose(geo.grid_affine, ref_geo.grid_affine, atol=1e-9)
        mark_vox = np.argwhere(new_vol == 3000).mean(axis=0)  # the cube's centre in this file's voxels
        np.testing.assert_allclose(geo.voxel_to_world([mark_vox])[0], mark_world, atol=1e-9)
        # the bright grid voxels (in HU, before windowing saturates) are centred on the mark in the file's voxels
        peak = mark_on_grid(ResampleToGrid(recipe)(make_image(new_vol, new_aff)))
        np.testing.assert_allclose(geo.grid_to_voxel([peak])[0], mark_vox, atol=1e-6)


def test_grid_axes_follow_axcodes() -> None:
    vol, aff = phantom_hu(), ras_affine()
    ras = preprocess(make_image(vol, aff), PreprocessingRecipe(spatial_size=GRID))
    lps = preprocess(make_image(vol, aff), PreprocessingRecipe(spatial_size=GRID, axcodes="LPS"))
    np.testing.assert_allclose(lps.numpy(), ras.numpy()[:, ::-1, ::-1, :], atol=1e-6)
    geo = GridGeometry.from_dict(ras.meta["grid_geometry"])
    assert np.all(np.diag(geo.grid_affine)[:3] > 0)  # grid axis 0 runs towards +R, 1 +A, 2 +S
    # FOV -> grid (stretch): the grid's outer faces are the volume's outer voxel faces
    np.testing.assert_allclose(geo.box_grid_to_world([-0.5] * 3 + [s - 0.5 for s in GRID]),
                               geo.box_voxel_to_world([-0.5] * 3 + [s - 0.5 for s in SHAPE]), atol=1e-9)


def test_box_round_trips() -> None:
    rng = np.random.default_rng(1)
    aff = ras_affine()
    new_vol, new_aff, _ = reorder(phantom_hu(), aff, *LPS_SAGITTAL)
    shape = new_vol.shape
    for recipe in (PreprocessingRecipe(spatial_size=GRID), PreprocessingRecipe(spatial_size=GRID, fit="letterbox"),
                   PreprocessingRecipe(spatial_size=GRID, fit="crop_or_pad", target_spacing=(2, 2, 4))):
        geo = GridGeometry.from_dict(compute_grid_geometry(new_aff, shape, recipe).to_dict())
        for _ in range(5):
            lo = rng.uniform(0, 10, 3)
            box = np.concatenate([lo, lo + rng.uniform(1, 8, 3)])
            np.testing.assert_allclose(geo.box_voxel_to_grid(geo.box_grid_to_voxel(box)), box, atol=1e-9)
            np.testing.assert_allclose(geo.box_world_to_grid(geo.box_grid_to_world(box)), box, atol=1e-9)
            np.testing.assert_allclose(geo.box_voxel_to_world(geo.box_grid_to_voxel(box)),
                                       geo.box_grid_to_world(box), atol=1e-9)
            np.testing.assert_allclose(geo.box_world_to_voxel(geo.box_voxel_to_world(box)), box, atol=1e-9)
            pts = rng.uniform(0, 20, (4, 3))
            np.testing.assert_allclose(geo.voxel_to_grid(geo.grid_to_voxel(pts)), pts, atol=1e-9)
            np.testing.assert_allclose(geo.world_to_voxel(geo.grid_to_world(pts)), geo.grid_to_voxel(pts), atol=1e-9)


def test_grid_box_around_blob_maps_onto_blob_voxels() -> None:
    """Invertibility: threshold the blob on the grid, box it, map the box to the stored (LPS sagittal) file."""
    vol, aff = phantom_hu(), ras_affine()
    new_vol, new_aff, _ = reorder(vol, aff, *LPS_SAGITTAL)
    out = ResampleToGrid(PreprocessingRecipe(spatial_size=GRID, interpolation="nearest"))(make_image(new_vol, new_aff))
    idx = np.argwhere(out[0].numpy() == 900)
    grid_box = np.concatenate([idx.min(0) - 0.5, idx.max(0) + 0.5])  # whole grid voxels
    geo = GridGeometry.from_dict(out.meta["grid_geometry"])
    region = new_vol[geo.voxel_box_to_slices(geo.box_grid_to_voxel(grid_box))]
    blob = new_vol == 900
    assert int((region == 900).sum()) == int(blob.sum())  # every blob voxel inside the box ...
    assert region.size <= 1.6 * blob[np.ix_(*[np.any(blob, axis=tuple(a for a in range(3) if a != k))
                                              for k in range(3)])].size  # ... and the box is tight


def test_agrees_with_naive_monai_chain_on_smooth_volume() -> None:
    vol, aff = smooth_volume(), ras_affine()
    new_vol, new_aff, _ = reorder(vol, aff, *LPS_SAGITTAL)
    img = make_image(new_vol, new_aff, "MR")
    naive = Resize(GRID, mode="trilinear")(Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img))
    for antialias, tol in ((False, 1e-3), (True, 0.05)):
        mine = ResampleToGrid(PreprocessingRecipe(spatial_size=GRID, antialias=antialias))(img)
        err = np.abs(mine.numpy() - naive.numpy()) / np.ptp(vol)
        assert err.max() < tol and err.mean() < tol / 4, (antialias, err.max(), err.mean())


def test_oblique_volume_matches_monai_spatial_resample() -> None:
    """A tilted acquisition: the one composed map agrees with MONAI's SpatialResample onto the same grid."""
    vol = smooth_volume()
    c, s_, t = np.cos(np.deg2rad(25)), np.sin(np.deg2rad(25)), 0.3
    rot = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)],
                                                                     [0, np.sin(t), np.cos(t)]])
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = rot @ np.diag(SPACING), ORIGIN
    img = make_image(vol, aff, "MR")
    size = (30, 30, 16)
    mine = ResampleToGrid(PreprocessingRecipe(spatial_size=size, antialias=False, background=-1.0))(img)
    ref = SpatialResample(mode="bilinear", padding_mode="zeros", align_corners=True)(
        img, dst_affine=mine.affine, spatial_size=size)
    vox = GridGeometry.from_dict(mine.meta["grid_geometry"]).grid_to_voxel(np.argwhere(np.ones(size)))
    vox = vox.reshape(*size, 3)
    inner = np.all((vox >= 0) & (vox <= np.array(SHAPE) - 1), axis=-1)  # no padding involved
    beyond = np.any((vox < -0.5) | (vox > np.array(SHAPE) - 0.5), axis=-1)
    assert inner.mean() > 0.2 and beyond.mean() > 0.2
    np.testing.assert_allclose(mine[0].numpy()[inner], ref[0].numpy()[inner], atol=1e-3)
    assert np.all(mine[0].numpy()[beyond] == -1.0)


def test_antialias_suppresses_aliasing_of_thin_lines() -> None:
    vol = np.zeros((64, 8, 8), np.float32)
    vol[::3] = 300.0  # 1-voxel lines every 3 voxels; 4x downsampling aliases them into a beat pattern
    img = make_image(vol, np.eye(4), "MR")
    size = (16, 8, 8)
    plain = ResampleToGrid(PreprocessingRecipe(spatial_size=size, antialias=False))(img)[0, :, 4, 4].numpy()
    filtered = ResampleToGrid(PreprocessingRecipe(spatial_size=size))(img)[0, :, 4, 4].numpy()
    assert np.ptp(plain[1:-1]) > 140 and np.ptp(filtered[1:-1]) < 60
    assert abs(filtered[1:-1].mean() - 100.0) < 10  # mean intensity preserved


def test_letterbox_and_crop_or_pad_place_the_fov() -> None:
    vol = np.full((40, 20, 10), 100.0, np.float32)
    img = make_image(vol, np.eye(4), "CT")
    box = ResampleToGrid(PreprocessingRecipe(spatial_size=(20, 20, 5), fit="letterbox"))(img)
    assert np.allclose(box.meta["grid_geometry"]["grid_affine"][0][0], 2.0)
    assert np.allclose(box.meta["grid_geometry"]["grid_affine"][1][1], 2.0)  # same in-plane mm spacing
    assert torch.allclose(box[0, :, 5:15], torch.tensor(100.0))
    assert torch.all(box[0, :, :5] == -1024) and torch.all(box[0, :, 15:] == -1024)
    cp = ResampleToGrid(PreprocessingRecipe(spatial_size=(20, 30, 5), fit="crop_or_pad",
                                            target_spacing=(1.0, 1.0, 2.0)))(img)
    geo = GridGeometry.from_dict(cp.meta["grid_geometry"])
    np.testing.assert_allclose(geo.grid_to_world([[9.5, 14.5, 2.0]])[0], [19.5, 9.5, 4.5])  # centred on the FOV
    assert torch.allclose(cp[0, :, 5:25], torch.tensor(100.0)) and torch.all(cp[0, :, :5] == -1024)  # X cropped
    assert torch.all(cp[0, :, 25:] == -1024)  # Y padded on both sides


def test_samplers_agree() -> None:
    vol, aff = phantom_hu(), ras_affine()
    img = make_image(*reorder(vol, aff, *LPS_SAGITTAL)[:2])
    recipe = PreprocessingRecipe(spatial_size=(20, 17, 9))
    a = ResampleToGrid(recipe, sampler="torch")(img)
    b = ResampleToGrid(recipe, sampler="scipy")(img)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-2)


def test_2d_geometry_replicates_one_slice() -> None:
    img = make_image(np.random.default_rng(0).random((30, 20, 1), dtype=np.float32), np.diag([0.5, 0.5, 1, 1]),
                     "CR", is_2d=True)
    out = preprocess(img, PreprocessingRecipe(spatial_size=(15, 10, 4)))
    geo = GridGeometry.from_dict(out.meta["grid_geometry"])
    assert geo.is_2d
    z = geo.grid_to_voxel([[0, 0, k] for k in range(4)])[:, 2]
    assert np.all(np.abs(z) < 0.5)  # every depth index is inside the single slice
    np.testing.assert_allclose(geo.grid_to_voxel([[0, 0, 0], [14, 9, 0]])[:, :2], [[0.5, 0.5], [28.5, 18.5]])


# ------------------------------------------------------------------------------------------ transforms API
def test_dictionary_transforms_and_compose() -> None:
    recipe = PreprocessingRecipe(spatial_size=GRID)
    img = make_image(phantom_hu(), ras_affine())
    chain = preprocessing_transforms(recipe, keys=("image", "prior"), load=False, allow_missing_keys=True)
    out = chain({"image": img, "text": "hello"})
    assert out["text"] == "hello" and "prior" not in out
    np.testing.assert_allclose(out["image"].numpy(), preprocess(img, recipe).numpy())
    two = ModalityIntensityd("image", recipe)(ResampleToGridd("image", recipe)({"image": img}))
    assert torch.equal(two["image"], out["image"])
    with pytest.raises(KeyError):
        ResampleToGridd("prior", recipe)({"image": img})


def test_outputs_survive_monai_collate_and_decollate() -> None:
    recipe = PreprocessingRecipe(spatial_size=GRID)
    ct = preprocess(make_image(phantom_hu(), ras_affine(), "CT"), recipe)
    mr = preprocess(make_image(smooth_volume(), ras_affine(), "MR"), recipe)
    batch = list_data_collate([{"image": ct}, {"image": mr}])
    assert tuple(batch["image"].shape) == (2, 3, *GRID)
    for item, original in zip(decollate_batch(batch), (ct, mr)):
        geo = GridGeometry.from_dict(item["image"].meta["grid_geometry"])
        np.testing.assert_allclose(geo.grid_affine, GridGeometry.from_dict(original.meta["grid_geometry"]).grid_affine)
        assert PreprocessingRecipe.from_json(item["image"].meta["preprocessing_recipe"]) == recipe


# ------------------------------------------------------------------------------------------ files (radfm3d.io)
def test_nifti_ras_nifti_lps_and_dicom_series_agree(tmp_path: Path) -> None:
    import nibabel as nib

    from radfm3d import io
    vol, aff = phantom_hu(), ras_affine()
    ras_img = make_image(vol, aff)
    io.save_nifti(ras_img, tmp_path / "ras.nii.gz")
    new_vol, new_aff, _ = reorder(vol, aff, *LPS_SAGITTAL)
    nib.save(nib.Nifti1Image(new_vol.astype(np.int16), new_aff), str(tmp_path / "lps_sagittal.nii.gz"))
    assert nib.aff2axcodes(new_aff) == ("P", "I", "L")
    io.save_dicom_series(ras_img, tmp_path / "dicom", modality="CT")

    recipe = PreprocessingRecipe(spatial_size=GRID)
    mark_world = aff[:3, :3] @ MARK_CENTRE + aff[:3, 3]
    outputs = []
    for source in ("ras.nii.gz", "lps_sagittal.nii.gz", "dicom"):
        loaded = io.load_image(tmp_path / source, modality="CT")
        geo_in = loaded.affine.numpy()
        mark_vox = np.argwhere(loaded[0].numpy() == 3000).mean(axis=0)
        np.testing.assert_allclose(geo_in[:3, :3] @ mark_vox + geo_in[:3, 3], mark_world, atol=1e-3)
        out = preprocess(loaded, recipe)
        geo = GridGeometry.from_dict(out.meta["grid_geometry"])
        peak = mark_on_grid(ResampleToGrid(recipe)(loaded))
        np.testing.assert_allclose(geo.grid_to_voxel([peak])[0], mark_vox, atol=1e-3)
        np.testing.assert_allclose(geo.grid_to_world([peak])[0], mark_world, atol=1e-3)
        outputs.append(out.numpy())
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], atol=2e-3)


def test_load_scan_in_compose(tmp_path: Path) -> None:
    from radfm3d import io

    io.save_nifti(make_image(phantom_hu(), ras_affine()), tmp_path / "scan.nii.gz")
    recipe = PreprocessingRecipe(spatial_size=GRID)
    out = preprocessing_transforms(recipe)({"image": str(tmp_path / "scan.nii.gz"), "modality": "CT"})
    assert tuple(out["image"].shape) == (3, *GRID)
    assert json.loads(out["image"].meta["intensity"])["mode"] == "ct_windows"  # the manifest's modality hint
    loaded = LoadScand("image")({"image": str(tmp_path / "scan.nii.gz")})["image"]
    assert tuple(loaded.shape) == (1, *SHAPE)


def test_inf_after_the_float32_cast_or_scaling_is_refused():
    from radfm3d.errors import RadFM3DInputError

    recipe = PreprocessingRecipe(spatial_size=(8, 8, 4))
    big = np.full((8, 8, 4), 1e39, np.float64)  # finite in float64, Inf in float32
    image = MetaTensor(torch.from_numpy(big)[None], affine=torch.eye(4, dtype=torch.float64),
                       meta={"filename_or_obj": "big64", "modality": "MR"})
    with pytest.raises(RadFM3DInputError, match="big64.*float32"):
        ResampleToGrid(recipe)(image)
    nan = MetaTensor(torch.full((1, 8, 8, 4), float("nan")), affine=torch.eye(4, dtype=torch.float64),
                     meta={"filename_or_obj": "nan32", "modality": "MR"})
    with pytest.raises(RadFM3DInputError, match="nan32.*intensity scaling"):
        ModalityIntensity(recipe)(nan)
