# Copyright (c) radfm3d contributors. Apache-2.0.
"""radfm3d.io: every reader on files written by other software and on generated files with known geometry,
and every kind of bad input gives a RadFM3DInputError naming the file and the problem."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from nibabel.testing import data_path as NIB_DATA

from radfm3d.errors import RadFM3DInputError
from radfm3d.io import cli, load_image, save_dicom_series, save_nifti

try:
    from tests.conftest import SyntheticVolume, make_synthetic_volume
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from conftest import SyntheticVolume, make_synthetic_volume

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
META_KEYS = ("filename_or_obj", "source_format", "original_shape", "original_spacing", "original_affine",
             "modality", "is_2d", "space")


def pydicom_file(name: str) -> str:
    """A file shipped with pydicom or pydicom-data (both installed by `make test`; a missing one fails)."""
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    assert path is not None, f"{name} not found: pip install pydicom-data"
    return path


def load_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_image(*args, **kwargs)


def world_of(image, ijk) -> np.ndarray:
    return (image.affine.numpy() @ np.array([*ijk, 1.0]))[:3]


def dicom_affine_ras(ds) -> np.ndarray:
    """Independent reference: DICOM single-slice geometry -> voxel (column, row, 0) -> RAS."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return LPS_RAS @ lps


def assert_error(excinfo, source, *fragments: str) -> None:
    message = str(excinfo.value)
    assert str(source) in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message


# ------------------------------------------------------------------------------------ the error type
def test_input_error_format_and_pickle():
    err = RadFM3DInputError("scan.nii.gz", "empty file")
    assert str(err) == "scan.nii.gz: empty file" and isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.source, back.problem, str(back)) == ("scan.nii.gz", "empty file", str(err))


# ------------------------------------------------------------------------------------ real DICOM files
def test_ct_small_hu_and_geometry():
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = load_image(path)
    assert isinstance(image, MetaTensor) and image.shape == (1, 128, 128, 1) and image.dtype == torch.float32
    assert all(k in image.meta for k in META_KEYS)
    assert image.meta["source_format"] == "dicom" and image.meta["modality"] == "CT" and image.meta["is_2d"]
    assert image.meta["series_uid"] == ds.SeriesInstanceUID and image.meta["space"] == "RAS"
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(image[0, :, :, 0].numpy(), hu.T)  # X = column, Y = row
    assert float(ds.RescaleIntercept) == -1024 and image.min() < -800  # HU, not raw
    np.testing.assert_allclose(image.affine.numpy()[:3, :2], dicom_affine_ras(ds)[:3, :2], atol=1e-6)
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], dicom_affine_ras(ds)[:3, 3], atol=1e-6)
    assert image.affine.dtype == torch.float64
    assert image.meta["original_spacing"] == pytest.approx((0.661468, 0.661468, float(ds.SliceThickness)))


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                     "MR_small_jp2klossless.dcm"])
def test_mr_small_encodings_agree(variant):
    reference = load_image(pydicom_file("MR_small.dcm"))
    image = load_image(pydicom_file(variant))
    assert reference.meta["modality"] == image.meta["modality"] == "MR"
    np.testing.assert_array_equal(image.numpy(), reference.numpy())
    np.testing.assert_allclose(image.affine.numpy(), reference.affine.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "JPEG-LL.dcm"])
def test_compressed_without_decoder_names_the_package(name):
    from pydicom.pixels import get_decoder

    path = pydicom_file(name)
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(ts).is_available:  # a decoder is installed: then it must simply read
        assert load_image(path).ndim == 4
        return
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(path)
    assert_error(excinfo, Path(path).name, "no decoder", "pip install pylibjpeg")


def test_monochrome1_radiograph_is_inverted():
    path = pydicom_file("RG3_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = load_image(path)
    raw = ds.pixel_array.astype(np.float32)
    assert image.shape == (1, ds.Columns, ds.Rows, 1) and image.meta["is_2d"] and image.meta["modality"] == "CR"
    np.testing.assert_array_equal(image[0, :, :, 0].numpy(), (raw.min() + raw.max() - raw).T)
    np.testing.assert_allclose(image.meta["original_spacing"], (1.0, 1.0, 1.0))  # no PixelSpacing: 1 mm


def test_colour_dicom_becomes_luminance():
    rgb = load_image(pydicom_file("SC_rgb.dcm"))
    ybr = load_image(pydicom_file("SC_ybr_full_uncompressed.dcm"))
    raw = pydicom.dcmread(pydicom_file("SC_rgb.dcm")).pixel_array.astype(np.float64)
    assert rgb.shape == (1, 100, 100, 1)
    np.testing.assert_allclose(rgb[0, :, :, 0].numpy(), (raw @ [0.299, 0.587, 0.114]).T, atol=1e-3)
    assert np.abs(rgb.numpy() - ybr.numpy()).max() < 8  # same picture, YBR rounding only
    palette = load_image(pydicom_file("OBXXXX1A.dcm"))
    assert palette.shape == (1, 800, 600, 1) and float(palette.std()) > 0


def test_enhanced_ct_multiframe_geometry():
    path = pydicom_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    image = load_image(path)
    assert image.meta["source_format"] == "dicom-multiframe" and image.shape == (1, 512, 512, 2)
    positions = [np.array([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
                 for f in ds.PerFrameFunctionalGroupsSequence]
    iop = np.array([float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                    .ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort([p @ normal for p in positions])
    for z, frame in enumerate(order):  # each loaded slice sits at its frame's ImagePositionPatient
        np.testing.assert_allclose(world_of(image, (0, 0, z)), (LPS_RAS[:3, :3] @ positions[frame]), atol=1e-4)
        raw = ds.pixel_array[frame].astype(np.float32) - 1024.0  # shared RescaleIntercept -1024
        np.testing.assert_array_equal(image[0, :, :, z].numpy(), raw.T)
    assert image.meta["original_spacing"] == pytest.approx((0.388672, 0.388672, 10.0))


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm"])
def test_enhanced_mr_without_positions_warns_and_stacks(name):
    with pytest.warns(UserWarning, match="without per-frame positions"):
        image = load_image(pydicom_file(name))
    raw = pydicom.dcmread(pydicom_file("emri_small.dcm")).pixel_array
    assert image.shape == (1, 64, 64, 10) and image.meta["modality"] == "MR" and not image.meta["is_2d"]
    np.testing.assert_array_equal(image[0].numpy(), raw.transpose(2, 1, 0))
    assert image.meta["original_spacing"][2] == pytest.approx(1.2)  # SpacingBetweenSlices


def test_rt_dose_grid_frame_offsets():
    path = pydicom_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    image = load_image(path)
    assert image.shape == (1, 10, 10, 15)
    steps = np.diff([float(v) for v in ds.GridFrameOffsetVector])
    assert image.meta["original_spacing"][2] == pytest.approx(abs(steps[0]))
    scaled = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)  # raw, unscaled in load_image
    assert scaled.max() > 0 and float(image.max()) == pytest.approx(float(ds.pixel_array.max()))


@pytest.mark.parametrize("name, fragments", [
    ("MR_truncated.dcm", ("corrupt or truncated",)),
    ("reportsi.dcm", ("not an image",)),
    ("examples_ybr_color.dcm", ("30 frames", "cine/time")),
])
def test_bad_real_dicom_files(name, fragments):
    path = pydicom_file(name)
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(path)
    assert_error(excinfo, Path(path).name, *fragments)


def test_nibabel_dicom_pair_as_series(tmp_path):
    for name in ("1.dcm", "0.dcm"):
        shutil.copy(Path(NIB_DATA) / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not dicom")  # ignored
    image = load_image(tmp_path)
    assert image.meta["source_format"] == "dicom-series" and image.shape == (1, 256, 256, 2)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(tmp_path / "0.dcm"), str(tmp_path / "1.dcm")])
    ref = reader.Execute()
    ref_lps = np.eye(4)
    ref_lps[:3, :3] = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    ref_lps[:3, 3] = ref.GetOrigin()
    ours = image.affine.numpy()
    np.testing.assert_allclose(ours[:, [0, 1, 3]], (LPS_RAS @ ref_lps)[:, [0, 1, 3]], atol=1e-4)
    # the slice step is the true IPP difference (here not along the slightly oblique normal, which ITK assumes)
    ipp = [np.array([float(v) for v in pydicom.dcmread(tmp_path / n).ImagePositionPatient]) for n in ("0.dcm", "1.dcm")]
    np.testing.assert_allclose(ours[:3, 2], LPS_RAS[:3, :3] @ (ipp[1] - ipp[0]), atol=1e-6)
    np.testing.assert_array_equal(image[0].numpy(), sitk.GetArrayFromImage(ref).transpose(2, 1, 0))


# ------------------------------------------------------------------------------------ real NIfTI files
@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"])
def test_nibabel_nifti_files(name):
    path = Path(NIB_DATA) / name
    ref = nib.load(str(path))
    image = load_image(path)
    assert image.meta["source_format"] == "nifti" and image.shape == (1, *ref.shape)
    np.testing.assert_allclose(image.affine.numpy(), ref.affine)
    np.testing.assert_allclose(image[0].numpy(), ref.get_fdata(), rtol=1e-6)
    assert image.meta["original_spacing"] == pytest.approx(ref.header.get_zooms()[:3])


@pytest.mark.parametrize("name, volumes", [("example4d.nii.gz", 2), ("functional.nii", 20)])
def test_nibabel_4d_is_explained(name, volumes):
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(Path(NIB_DATA) / name)
    assert_error(excinfo, name, f"4D image with {volumes} volumes (time/echo)", "load_image(arr[..., t]")


# ------------------------------------------------------------------------------------ generated files, known geometry
def _write_itk(vol: SyntheticVolume, path: Path) -> None:
    """Write with SimpleITK from a RAS affine (ITK stores LPS)."""
    lps = LPS_RAS @ vol.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(vol.array.transpose(2, 1, 0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(img, str(path))


def _write_nifti_lps_flipped(vol: SyntheticVolume, path: Path) -> None:
    """The same world picture stored with flipped X and Y voxel axes (an 'LPS' NIfTI)."""
    nx, ny, _ = vol.array.shape
    flip = np.eye(4)
    flip[0, 0], flip[0, 3], flip[1, 1], flip[1, 3] = -1, nx - 1, -1, ny - 1
    nib.save(nib.Nifti1Image(vol.array[::-1, ::-1, :].copy(), vol.affine @ flip), str(path))


WRITERS = {
    "nifti-ras": lambda v, d: save_nifti(load_image(v.array, affine=v.affine), d / "vol.nii.gz"),
    "nifti-lps-flipped": lambda v, d: _write_nifti_lps_flipped(v, d / "lps.nii") or d / "lps.nii",
    "dicom-series": lambda v, d: save_dicom_series(load_image(v.array, affine=v.affine), d / "series") and d / "series",
    "nrrd": lambda v, d: _write_itk(v, d / "vol.nrrd") or d / "vol.nrrd",
    "mha": lambda v, d: _write_itk(v, d / "vol.mha") or d / "vol.mha",
    "mhd": lambda v, d: _write_itk(v, d / "vol.mhd") or d / "vol.mhd",
}
FORMATS = {"nifti-ras": "nifti", "nifti-lps-flipped": "nifti", "dicom-series": "dicom-series", "nrrd": "nrrd",
           "mha": "mha", "mhd": "mha"}


@pytest.mark.parametrize("rotation", [0.0, 20.0])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_round_trip_same_world_geometry(writer, rotation, tmp_path):
    vol = make_synthetic_volume(rotation_deg=rotation)
    path = WRITERS[writer](vol, tmp_path)
    image = load_image(path)
    assert image.meta["source_format"] == FORMATS[writer] and image.shape == (1, 32, 32, 16)
    marked = np.unravel_index(int(torch.argmax(image[0])), image.shape[1:])
    np.testing.assert_allclose(world_of(image, marked), vol.marked_world, atol=1e-4)
    # every voxel: same value at the same world position
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    world = np.c_[ijk, np.ones(len(ijk))] @ image.affine.numpy().T
    src = np.rint(world @ np.linalg.inv(vol.affine).T)[:, :3].astype(int)
    np.testing.assert_array_equal(image[0].numpy()[tuple(ijk.T)], vol.array[tuple(src.T)])
    assert image.meta["original_spacing"] == pytest.approx((0.8, 0.9, 2.5), abs=1e-6)


def test_dicom_series_written_is_read_by_simpleitk(synthetic_volume, tmp_path):
    paths = save_dicom_series(load_image(synthetic_volume.array, affine=synthetic_volume.affine), tmp_path,
                              series_uid="1.2.3.4.5")
    assert len(paths) == 16
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.SeriesInstanceUID == "1.2.3.4.5"
    assert [float(v) for v in ds.PixelSpacing] == [0.9, 0.8]  # [row spacing (Y), column spacing (X)]
    assert (ds.Rows, ds.Columns) == (32, 32) and ds.pixel_array.dtype == np.int16
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    ref = reader.Execute()
    ours = load_image(tmp_path)
    lps = np.eye(4)
    lps[:3, :3] = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    np.testing.assert_allclose(ours.affine.numpy(), LPS_RAS @ lps, atol=1e-4)
    np.testing.assert_array_equal(ours[0].numpy(), sitk.GetArrayFromImage(ref).transpose(2, 1, 0))


def test_dicom_float_data_rescaled(tmp_path):
    values = np.linspace(-3.5, 7.25, 8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    save_dicom_series(load_image(values), tmp_path, modality="MR")
    back = load_image(tmp_path)
    assert back.meta["modality"] == "MR"
    np.testing.assert_allclose(back[0].numpy(), values, atol=(values.max() - values.min()) / 60000)


def test_nifti_multichannel_round_trip(tmp_path):
    data = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    image = MetaTensor(torch.from_numpy(data), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    back = load_image(save_nifti(image, tmp_path / "two.nii"))
    assert back.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(back.numpy(), data)


# ------------------------------------------------------------------------------------ 2D files and arrays
def test_png_and_jpeg(tmp_path):
    from PIL import Image

    rgb = np.zeros((20, 30, 3), dtype=np.uint8)  # (rows, columns, RGB)
    rgb[5, 7] = (255, 128, 0)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = load_image(tmp_path / "c.png")
    assert image.shape == (1, 30, 20, 1) and image.meta["is_2d"] and image.meta["source_format"] == "png"
    assert float(image[0, 7, 5, 0]) == pytest.approx(0.299 * 255 + 0.587 * 128)
    np.testing.assert_allclose(image.affine.numpy(), np.diag([-1.0, -1.0, 1.0, 1.0]))  # ITK default, 1 mm
    grey16 = (np.arange(20 * 30, dtype=np.uint16) * 100).reshape(20, 30)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g.png")[0, :, :, 0].numpy(), grey16.T)
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(tmp_path / "x.jpg", quality=95)
    jpeg = load_image(tmp_path / "x.jpg")
    assert jpeg.meta["source_format"] == "jpeg" and abs(float(jpeg.mean()) - 200) < 2


def test_arrays_and_tensors(synthetic_volume):
    vol = synthetic_volume
    from_np = load_image(vol.array, affine=vol.affine, modality="CT")
    from_torch = load_image(torch.from_numpy(vol.array)[None], affine=torch.from_numpy(vol.affine))
    assert from_np.shape == from_torch.shape == (1, 32, 32, 16)
    assert from_np.meta["source_format"] == "array" and from_np.meta["modality"] == "CT"
    np.testing.assert_array_equal(from_np.numpy(), from_torch.numpy())
    again = load_image(from_np)  # a MetaTensor keeps its affine and metadata
    np.testing.assert_allclose(again.affine.numpy(), vol.affine)
    assert again.meta["modality"] == "CT"
    flat = load_image(np.ones((10, 12), np.uint8))
    assert flat.shape == (1, 10, 12, 1) and flat.meta["is_2d"]
    assert load_image(vol.array, dtype=np.int16).dtype == torch.int16


# ------------------------------------------------------------------------------------ DICOM series problems
def _series(tmp_path: Path, name: str = "s", **kwargs) -> list[Path]:
    vol = make_synthetic_volume(shape=(8, 8, 6), marked_ijk=(1, 2, 3))
    return save_dicom_series(load_image(vol.array, affine=vol.affine), tmp_path / name, **kwargs)


def test_series_sorted_by_position_not_instance_number(tmp_path):
    paths = _series(tmp_path)
    reference = load_image(tmp_path / "s")
    for i, path in enumerate(paths):  # scramble InstanceNumber and file names
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = (i * 4) % 7 + 1
        ds.save_as(path.with_name(f"z{(i * 5) % 6}_{i}.dcm"))
        path.unlink()
    shuffled = load_image(tmp_path / "s")
    np.testing.assert_array_equal(shuffled.numpy(), reference.numpy())
    np.testing.assert_allclose(shuffled.affine.numpy(), reference.affine.numpy())


def test_duplicate_slice_is_an_error(tmp_path):
    paths = _series(tmp_path)
    shutil.copy(paths[2], paths[2].with_name("copy.dcm"))
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(tmp_path / "s")
    assert_error(excinfo, tmp_path / "s", "duplicate", "copy.dcm")


def test_missing_slice_is_an_error(tmp_path):
    paths = _series(tmp_path)
    paths[3].unlink()
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(tmp_path / "s")
    assert_error(excinfo, tmp_path / "s", "inconsistent spacing between slices", "missing slice")


def test_several_series_pick_largest_or_by_uid(tmp_path):
    _series(tmp_path, "both", series_uid="1.2.3.1")
    vol = make_synthetic_volume(shape=(8, 8, 3), marked_ijk=(1, 2, 1))
    save_dicom_series(load_image(vol.array, affine=vol.affine), tmp_path / "both" / "small", series_uid="1.2.3.2")
    with pytest.warns(UserWarning, match=r"2 DICOM series.*1\.2\.3\.1.*1\.2\.3\.2"):
        largest = load_image(tmp_path / "both")
    assert largest.meta["series_uid"] == "1.2.3.1" and largest.shape[-1] == 6
    chosen = load_image(tmp_path / "both", series_uid="1.2.3.2")
    assert chosen.meta["series_uid"] == "1.2.3.2" and chosen.shape[-1] == 3
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(tmp_path / "both", series_uid="9.9")
    assert_error(excinfo, tmp_path / "both", "'9.9' is not in this folder", "1.2.3.1")


# ------------------------------------------------------------------------------------ bad inputs
def _nifti(tmp_path: Path, data: np.ndarray, affine=None, name="bad.nii.gz") -> Path:
    path = tmp_path / name
    img = nib.Nifti1Image(data, None)
    img.header.set_sform(np.eye(4) if affine is None else affine, code=1)  # set as is, even if broken
    nib.save(img, str(path))
    return path


def _truncated_niigz(tmp_path: Path) -> Path:
    path = _nifti(tmp_path, np.random.default_rng(0).normal(size=(32, 32, 16)).astype(np.float32), name="cut.nii.gz")
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def _truncated_nii(tmp_path: Path) -> Path:
    path = _nifti(tmp_path, np.ones((32, 32, 16), np.float32), name="cut.nii")
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _huge_header_nifti(tmp_path: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))  # 64e9 voxels claimed, no data written
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def _huge_header_nrrd(tmp_path: Path) -> Path:
    path = tmp_path / "huge.nrrd"
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"  # header only
                    "sizes: 5000 5000 5000\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                    "space origin: (0,0,0)\nendian: little\nencoding: raw\n\n")
    return path


def _truncated_mha(tmp_path: Path) -> Path:
    _write_itk(make_synthetic_volume(), tmp_path / "cut.mha")
    blob = (tmp_path / "cut.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(blob[: len(blob) - 5000])
    return tmp_path / "cut.mha"


def _mhd_without_raw(tmp_path: Path) -> Path:
    _write_itk(make_synthetic_volume(), tmp_path / "lone.mhd")
    for raw in tmp_path.glob("lone.*raw"):
        raw.unlink()
    return tmp_path / "lone.mhd"


def _truncated_png(tmp_path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "cut.png")
    blob = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    return tmp_path / "cut.png"


def _write(name: str, content: bytes):
    def make(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(content)
        return tmp_path / name
    return make


def _spacing_nifti(scale: float, name: str):
    return lambda tmp_path: _nifti(tmp_path, np.ones((4, 4, 4), np.float32), np.diag([scale, 1.0, 1.0, 1.0]), name)


BAD_FILES = {
    "missing": (lambda tmp_path: tmp_path / "nope.nii.gz", ("no such file",)),
    "empty": (_write("empty.nii.gz", b""), ("empty file",)),
    "unknown-extension": (_write("notes.txt", b"hello world" * 50), ("not a recognised image file",)),
    "text-as-nifti": (_write("fake.nii", b"hello world" * 50), ("not a readable nifti",)),
    "text-as-dicom": (_write("fake.dcm", b"hello world" * 50), ("not a dicom file",)),
    "text-as-png": (_write("fake.png", b"hello world" * 50), ("not a readable png",)),
    "truncated-nii.gz": (_truncated_niigz, ("corrupt or truncated nifti",)),
    "truncated-nii": (_truncated_nii, ("corrupt or truncated nifti",)),
    "truncated-mha": (_truncated_mha, ("corrupt or truncated mha",)),
    "mhd-without-raw": (_mhd_without_raw, ("corrupt or truncated mha",)),
    "truncated-png": (_truncated_png, ("corrupt or truncated png",)),
    "4d": (lambda p: _nifti(p, np.zeros((4, 4, 4, 3), np.int16)), ("4D image with 3 volumes (time/echo)",)),
    "5d": (lambda p: _nifti(p, np.zeros((4, 4, 4, 2, 3), np.int16)), ("5D data",)),
    "1d": (lambda p: _nifti(p, np.zeros((40,), np.int16)), ("1D data",)),
    "nan": (lambda p: _nifti(p, np.where(np.eye(4)[..., None] > 0, np.nan, 1.0).repeat(4, -1).astype(np.float32)),
            ("16 of 64 voxels are NaN or Inf",)),
    "inf": (lambda p: _nifti(p, np.full((4, 4, 4), np.inf, np.float32)), ("NaN or Inf",)),
    "zero-spacing": (_spacing_nifti(0.0, "zero.nii"), ("zero voxel spacing",)),
    "huge-spacing": (_spacing_nifti(120.0, "huge_sp.nii"), ("absurd voxel spacing",)),
    "tiny-spacing": (_spacing_nifti(0.001, "tiny_sp.nii"), ("absurd voxel spacing",)),
    "singular": (lambda p: _nifti(p, np.ones((4, 4, 4), np.float32), np.array(
        [[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]]), "sing.nii"), ("singular affine",)),
    "huge-header-nifti": (_huge_header_nifti, ("more than max_voxels", "nothing was read")),
    "huge-header-nrrd": (_huge_header_nrrd, ("more than max_voxels",)),
    "empty-folder": (lambda p: (p / "d").mkdir() or p / "d", ("no dicom images",)),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_raises_clear_error(case, tmp_path):
    make, fragments = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_quiet(path)
    assert_error(excinfo, path.name, *fragments)
    assert "Traceback" not in str(excinfo.value)


@pytest.mark.parametrize("source", ["CT_small.dcm", "eCT_Supplemental.dcm", "png"])
def test_max_voxels_checked_on_header(source, tmp_path):
    if source == "png":
        from PIL import Image

        path = tmp_path / "a.png"
        Image.fromarray(np.zeros((50, 60), np.uint8)).save(path)
    else:
        path = Path(pydicom_file(source))
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(path, max_voxels=1000)
    assert_error(excinfo, path.name, "more than max_voxels=1,000")


BAD_ARRAYS = {
    "4d": (np.zeros((4, 4, 4, 5)), None, "4D image with 5 volumes (time/echo)"),
    "5d": (np.zeros((2, 4, 4, 4, 5)), None, "5D data"),
    "1d": (np.zeros(7), None, "1D data"),
    "nan": (np.where(np.arange(27).reshape(3, 3, 3) == 4, np.nan, 0.0), None, "1 of 27 voxels are NaN or Inf"),
    "complex": (np.zeros((3, 3, 3), complex), None, "unsupported array dtype"),
    "affine-shape": (np.zeros((3, 3, 3)), np.eye(3), "affine must be a 4x4"),
    "zero-spacing": (np.zeros((3, 3, 3)), np.diag([1.0, 0.0, 1.0, 1.0]), "zero voxel spacing"),
    "absurd-spacing": (np.zeros((3, 3, 3)), np.diag([1.0, 1.0, 80.0, 1.0]), "absurd voxel spacing"),
    "nan-affine": (np.zeros((3, 3, 3)), np.full((4, 4), np.nan), "NaN/Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_arrays(case):
    array, affine, fragment = BAD_ARRAYS[case]
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(array, affine=affine)
    assert_error(excinfo, "<array>", fragment)


def test_affine_is_only_for_arrays(tmp_path):
    path = _nifti(tmp_path, np.ones((4, 4, 4), np.float32))
    with pytest.raises(RadFM3DInputError, match="only used for array input"):
        load_image(path, affine=np.eye(4))


# ------------------------------------------------------------------------------------ CLI
def test_cli_info(capsys, tmp_path):
    assert cli([str(Path(NIB_DATA) / "anatomical.nii")]) == 0
    out = capsys.readouterr().out
    assert "format:      nifti" in out and "orientation: LAS" in out and "2 x 2 x 2 mm" in out
    assert cli([str(tmp_path / "missing.nii"), "--json"]) == 2
    captured = capsys.readouterr()
    assert "missing.nii: no such file" in captured.err
    assert cli(["--json", pydicom_file("CT_small.dcm")]) == 0
    assert '"modality": "CT"' in capsys.readouterr().out


def test_gzip_magic_without_nifti_suffix_is_rejected(tmp_path):
    path = tmp_path / "scan.gz"
    path.write_bytes(gzip.compress(b"not an image"))
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(path)
    assert_error(excinfo, "scan.gz", "not a recognised image file")
    assert os.path.exists(path)


@pytest.mark.parametrize(
    "low, high, hint, expected",
    [(-1024, 1500, None, "CT"), (0, 1200, None, "unknown"), (-1024, 1500, "MR", "MR"), (-50, 80, None, "unknown")],
)
def test_untagged_nifti_modality_is_inferred_only_from_an_hu_signature(tmp_path, low, high, hint, expected):
    import nibabel as nib

    data = np.linspace(low, high, 8 * 8 * 4).reshape(8, 8, 4).astype(np.int16)
    path = tmp_path / "untagged.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    image = load_image(path, modality=hint)
    assert image.meta["modality"] == expected
    assert ("modality_inferred" in image.meta) is (expected == "CT" and hint is None)


# ------------------------------------------------------------------------------------ values after scaling and casts
def _patch_nifti(path: Path, offset: int, fmt: str, *values: float) -> Path:
    """Overwrite raw header fields of an uncompressed .nii (little-endian) in place."""
    import struct

    blob = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt * len(values), blob, offset, *values)
    path.write_bytes(bytes(blob))
    return path


def test_scl_slope_overflowing_float32_is_refused(tmp_path):
    data = np.full((6, 5, 4), 100, np.int16)
    path = _nifti(tmp_path, data, np.diag([1.0, 1.0, 2.0, 1.0]), name="slope.nii")
    assert float(load_image(path).max()) == 100.0  # sane before the header is damaged
    _patch_nifti(path, 112, "f", 3e38, 0.0)  # scl_slope, scl_inter: 100 * 3e38 is beyond float32
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_quiet(path)
    assert_error(excinfo, "slope.nii", "scl_slope", "overflow", "120 of 120")


def test_scl_slope_scaling_matches_nibabel(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-2000, 2000, (7, 6, 5)).astype(np.int16)
    path = _nifti(tmp_path, data, np.diag([1.0, 1.0, 2.0, 1.0]), name="scaled.nii.gz")
    img = nib.load(str(path))
    img.header.set_slope_inter(0.37, -12.5)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    expected = nib.load(str(path)).get_fdata(dtype=np.float64).astype(np.float32)
    got = load_image(path)[0].numpy()
    assert got.dtype == np.float32 and np.array_equal(got, expected)


@pytest.mark.parametrize("field_value", [0.0, -1.5, float("nan")])
def test_zero_or_negative_raw_pixdim_is_refused(field_value, tmp_path):
    path = _nifti(tmp_path, np.ones((6, 5, 4), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), name="pixdim.nii")
    _patch_nifti(path, 76 + 4 * 2, "f", field_value)  # pixdim[2]; nibabel "fixes" it while loading
    if not np.isnan(field_value):
        assert nib.load(str(path)).header.get_zooms()[1] > 0  # what nibabel shows is already repaired
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_quiet(path)
    assert_error(excinfo, "pixdim.nii", "zero or negative voxel spacing", "pixdim[2]")


def test_dtype_that_cannot_hold_the_values_is_refused(tmp_path):
    hu = np.linspace(-1024, 1500, 4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(hu, dtype=np.int8)
    assert_error(excinfo, "<array>", "do not fit dtype=int8", "-1024", "1500")
    path = _nifti(tmp_path, hu.astype(np.int16), np.eye(4), name="hu.nii.gz")
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_image(path, dtype=np.int8)
    assert_error(excinfo, "hu.nii.gz", "dtype=int8")
    with pytest.raises(RadFM3DInputError, match="float16"):
        load_image(hu * 100, dtype=np.float16)  # 150000 > 65504: would be Inf
    assert load_image(hu, dtype=np.int16).dtype == torch.int16  # a dtype that fits is fine
    with pytest.raises(RadFM3DInputError, match="not supported"):
        load_image(hu, dtype=np.complex64)


# ------------------------------------------------------------------------------------ memory budget
def test_byte_budget_refuses_valid_files_up_front(tmp_path):
    vol = make_synthetic_volume()
    nii = _nifti(tmp_path, vol.array.astype(np.int16), vol.affine, name="fine.nii.gz")
    series = tmp_path / "series"
    save_dicom_series(MetaTensor(torch.from_numpy(vol.array.astype(np.float32))[None],
                                 affine=torch.as_tensor(vol.affine)), series)
    mha = tmp_path / "fine.mha"
    _write_itk(vol, mha)
    voxels = int(np.prod(vol.array.shape))
    for path in (nii, series, mha):
        load_quiet(path)  # valid files: they read with the default budget
        with pytest.raises(RadFM3DInputError) as excinfo:
            load_quiet(path, max_bytes=voxels * 4 - 1)  # less than the float32 result alone
        assert_error(excinfo, path.name, "needs", "GB", "the limit is", "max_bytes=", "nothing was read")
        assert "corrupt" not in str(excinfo.value).lower() and "truncated" not in str(excinfo.value).lower()
    # the budget counts working copies too: an int16 NIfTI needs its stored pixels plus the float32 result
    with pytest.raises(RadFM3DInputError, match="the limit is"):
        load_quiet(nii, max_bytes=voxels * 5)
    assert load_quiet(nii, max_bytes=voxels * 6).shape[1:] == vol.array.shape
    assert load_quiet(nii, max_bytes=None).shape[1:] == vol.array.shape


# ------------------------------------------------------------------------------------ detached headers
def _raw_volume(path: Path, shape=(4, 3, 2)) -> bytes:
    blob = np.arange(int(np.prod(shape)), dtype="<i2").tobytes()
    path.write_bytes(blob)
    return blob


def _mhd(path: Path, data_file: str, shape=(4, 3, 2), extra_lines: str = "") -> Path:
    path.write_text("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                    f"DimSize = {' '.join(map(str, shape))}\nElementSpacing = 1 1 1\nElementType = MET_SHORT\n"
                    f"ElementDataFile = {data_file}\n{extra_lines}")
    return path


def _nhdr(path: Path, data_file: str, shape=(4, 3, 2), extra_lines: str = "") -> Path:
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
                    f"sizes: {' '.join(map(str, shape))}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                    f"space origin: (0,0,0)\nendian: little\nencoding: raw\ndata file: {data_file}\n{extra_lines}")
    return path


@pytest.mark.parametrize("writer", [_mhd, _nhdr], ids=["mhd", "nhdr"])
def test_detached_header_reads_only_its_own_folder(writer, tmp_path):
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "sub").mkdir()
    _raw_volume(tmp_path / "scan" / "sub" / "voxels.raw")
    _raw_volume(tmp_path / "outside.raw")
    ext = ".mhd" if writer is _mhd else ".nhdr"
    # below its folder: fine
    good = load_image(writer(tmp_path / "scan" / f"good{ext}", "sub/voxels.raw"))
    assert good.shape == (1, 4, 3, 2) and float(good.max()) == 23.0
    (tmp_path / "scan" / "link.raw").symlink_to(tmp_path / "outside.raw")
    passwd = "/etc/passwd" if os.path.exists("/etc/passwd") else str(tmp_path / "outside.raw")
    list_form = ("LIST", "sub/voxels.raw\n../outside.raw\n") if writer is _mhd else ("LIST", "sub/voxels.raw\n"
                                                                                        "../outside.raw\n")
    bad = {
        "dotdot": ("../outside.raw", ""),
        "absolute": (passwd, ""),
        "symlink": ("link.raw", ""),
        "list": list_form,
        "pattern": ("../outside%d.raw 1 2 1", ""),
    }
    for name, (data_file, extra) in bad.items():
        header = writer(tmp_path / "scan" / f"{name}{ext}", data_file, extra_lines=extra)
        with pytest.raises(RadFM3DInputError) as excinfo:
            load_quiet(header)
        assert_error(excinfo, header.name, "outside the header's folder", "nothing was read")


def test_attached_mha_pointing_elsewhere_is_refused(tmp_path):
    _raw_volume(tmp_path / "outside.raw")
    (tmp_path / "d").mkdir()
    header = _mhd(tmp_path / "d" / "x.mha", "../outside.raw")
    with pytest.raises(RadFM3DInputError, match="outside the header's folder"):
        load_quiet(header)


# ------------------------------------------------------------------------------------ DICOM folder walk bounds
def _small_series(folder: Path, slices: int = 3) -> list[Path]:
    arr = np.arange(6 * 5 * slices, dtype=np.float32).reshape(6, 5, slices)
    return save_dicom_series(MetaTensor(torch.from_numpy(arr)[None], affine=torch.eye(4, dtype=torch.float64)),
                             folder)


def test_dicom_folder_walk_is_bounded(tmp_path):
    _small_series(tmp_path / "flat", slices=5)
    assert load_quiet(tmp_path / "flat", max_files=5).shape == (1, 6, 5, 5)
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_quiet(tmp_path / "flat", max_files=4)
    assert_error(excinfo, "flat", "more than max_files=4", "point at the series folder")
    deep = tmp_path / "deep" / "a" / "b" / "c"
    _small_series(deep)
    assert load_quiet(tmp_path / "deep", max_depth=3).shape == (1, 6, 5, 3)
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_quiet(tmp_path / "deep", max_depth=2)
    assert_error(excinfo, "deep", "max_depth=2")


# ------------------------------------------------------------------------------------ DICOM fast path vs pydicom
def test_dicom_series_stored_bits_and_compressed_slices_match_pydicom(tmp_path):
    """12-bit signed pixels with junk in the unused high bits, and RLE-compressed slices (pydicom's decoder),
    read to the same values pydicom's pixel_array gives after the rescale."""
    from pydicom.uid import RLELossless

    rng = np.random.default_rng(3)
    arr = rng.integers(-2048, 2047, (7, 6, 4)).astype(np.float32)
    paths = save_dicom_series(MetaTensor(torch.from_numpy(arr)[None], affine=torch.eye(4, dtype=torch.float64)),
                              tmp_path / "s")
    expected = []
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        stored = ds.pixel_array.astype(np.int16)
        junk = (stored.view(np.uint16) & 0x0FFF) | (0x5000 if k % 2 else 0xA000)  # unused bits set
        ds.BitsStored, ds.HighBit = 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-7"
        ds.PixelData = junk.astype(np.uint16).tobytes()
        if k == 2:
            ds.compress(RLELossless)
        ds.save_as(p)
        ref = pydicom.dcmread(p).pixel_array.astype(np.float32) * np.float32(0.5) + np.float32(-7)
        expected.append(ref.T)
    got = load_image(tmp_path / "s")[0].numpy()
    assert np.array_equal(got, np.stack(expected, axis=-1))
    assert np.array_equal(got, arr * np.float32(0.5) - 7)  # and it is the written data


# ------------------------------------------------------------------------------------ info --json warnings
def test_cli_info_json_keeps_data_warnings_not_library_noise(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "noform.nii"
    img = nib.Nifti1Image(np.ones((4, 4, 3), np.float32), None)
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    nib.save(img, str(path))
    env = dict(os.environ, PYTHONWARNINGS="default")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", "import sys; from radfm3d.io import cli; sys.exit(cli(sys.argv[1:]))",
                           "--json", str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(summary["warnings"]) == 1 and "without sform/qform" in summary["warnings"][0], summary["warnings"]


def test_dicom_rescale_overflowing_float32_is_refused(tmp_path):
    paths = _small_series(tmp_path / "s", slices=3)
    ds = pydicom.dcmread(paths[1])
    ds.RescaleSlope = "1e38"  # a stored value of 29 * 1e38 is beyond float32
    ds.save_as(paths[1])
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_quiet(tmp_path / "s")
    assert_error(excinfo, str(tmp_path / "s"), "NaN or Inf")


@pytest.mark.parametrize("name", ["eCT_Supplemental.dcm", "emri_small.dcm", "rtdose.dcm", "CT_small.dcm"])
def test_uncompressed_frames_read_from_the_file_equal_pydicom_decoding(name, monkeypatch, tmp_path):
    """The direct frame reader (uncompressed files) gives exactly what pydicom's decoder path gives."""
    import radfm3d.io as rio

    path = pydicom_file(name)
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(path, folder / "f.dcm")
    direct = [load_quiet(path), load_quiet(folder)]
    used = []
    original = rio._read_native_pixels
    monkeypatch.setattr(rio, "_read_native_pixels", lambda *a, **k: used.append(1) or original(*a, **k))
    load_quiet(path)
    monkeypatch.setattr(rio, "_native_pixel_layout", lambda *a, **k: None)  # force pydicom's decoder
    decoded = [load_quiet(path), load_quiet(folder)]
    for a, b in zip(direct, decoded):
        assert a.dtype == b.dtype and torch.equal(a.as_tensor(), b.as_tensor())
        assert np.allclose(a.affine.numpy(), b.affine.numpy())
    if name != "CT_small.dcm":  # single-frame files keep pydicom's reader; multi-frame ones use the direct one
        assert used


def test_analyze_pair_image_symlinked_outside_is_refused(tmp_path):
    vol = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    nib.save(nib.Nifti1Pair(vol, np.eye(4)), str(tmp_path / "real.img"))
    (tmp_path / "scan").mkdir()
    shutil.copy(tmp_path / "real.hdr", tmp_path / "scan" / "pair.hdr")
    shutil.copy(tmp_path / "real.img", tmp_path / "scan" / "pair.img")
    assert float(load_image(tmp_path / "scan" / "pair.hdr").max()) == 23.0
    (tmp_path / "scan" / "pair.img").unlink()
    (tmp_path / "scan" / "pair.img").symlink_to(tmp_path / "real.img")
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_quiet(tmp_path / "scan" / "pair.hdr")
    assert_error(excinfo, "pair.hdr", "outside the header's folder")


@pytest.mark.parametrize("make", [_huge_header_nifti, _huge_header_nrrd], ids=["nifti", "nrrd"])
def test_header_over_the_byte_budget_is_refused_before_reading(make, tmp_path):
    path = make(tmp_path)  # a header only: reading anything beyond it would fail differently
    with pytest.raises(RadFM3DInputError) as excinfo:
        load_quiet(path, max_voxels=10**12)
    assert_error(excinfo, path.name, "GB (", "the limit is 16 GB", "nothing was read")
    assert "corrupt" not in str(excinfo.value).lower()
