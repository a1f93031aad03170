# Copyright (c) radfm3d contributors. Apache-2.0.
"""Reading and writing scans: the one place in radfm3d that touches image files.

:func:`load_image` turns a file, a DICOM folder or an array into a channel-first MONAI ``MetaTensor``
``(C, X, Y, Z)`` (2D images: ``(C, X, Y, 1)``) whose ``.affine`` maps voxel indices to world **RAS**
millimetres. Voxel order is kept as stored in the file (no reorientation here; that is
``radfm3d.transforms``' job). Every problem with the input is reported as a
:class:`~radfm3d.errors.RadFM3DInputError` naming the file and what is wrong, and headers are checked
(dimensionality, element count, memory need in bytes, spacing, affine, where a detached header's data files lie)
*before* pixel data are read; values are checked finite after every scaling, and the cast to the requested dtype
is refused when that dtype cannot hold them.

Conventions
-----------
* DICOM/ITK index order: X = column index (along the first ImageOrientationPatient vector),
  Y = row index, Z = slice (sorted by position along the slice normal, ascending).
* LPS (DICOM, ITK, NRRD, MHA) is converted to RAS by negating the first two world axes.
* 2D images without a patient geometry (PNG/JPEG, radiographs without ImageOrientationPatient) get the
  ITK default: identity direction in LPS (columns -> patient left, rows -> posterior), so in RAS the affine
  is ``diag(-sx, -sy, 1)``; spacing is PixelSpacing/ImagerPixelSpacing when known, else 1 mm.
* Colour images (RGB/YBR/palette DICOM, RGB PNG/JPEG) are converted to one luminance channel
  (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B), because every downstream recipe works on grey values.
* MONOCHROME1 DICOM is inverted (``min + max - value``) so that brighter means more signal, as in
  MONOCHROME2; CT is never inverted (values stay in HU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from radfm3d.errors import RadFM3DInputError

__all__ = ["load_image", "save_nifti", "save_dicom_series", "image_summary", "cli", "data_warnings",
           "detached_data_files",
           "dicom_folder_files", "MIN_SPACING_MM", "MAX_SPACING_MM", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_FILES",
           "DEFAULT_MAX_DEPTH"]

logger = logging.getLogger(__name__)

MIN_SPACING_MM = 0.01
"""Smaller voxel spacings are rejected as absurd (usually a units error in the header)."""
MAX_SPACING_MM = 50.0
"""Larger voxel spacings are rejected as absurd."""
DEFAULT_MAX_BYTES = 16 * 10**9
"""Default memory budget of one read (bytes): the result plus every working copy, checked from the header."""
DEFAULT_MAX_FILES = 50_000
"""A DICOM folder holding more files than this (at any depth) is refused rather than walked."""
DEFAULT_MAX_DEPTH = 8
"""A DICOM folder nested deeper than this is refused rather than walked."""

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_LUMA = np.array([0.299, 0.587, 0.114])
_ARRAY_SOURCE = "<array>"

_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img", ".img.gz")
_FORMAT_BY_SUFFIX = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha", ".dcm": "dicom",
                     ".dicom": "dicom", ".ima": "dicom", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
_KNOWN_EXTENSIONS = ".nii, .nii.gz, .hdr/.img, .nrrd, .nhdr, .mha, .mhd, .dcm, .png, .jpg/.jpeg or a DICOM folder"


@dataclass
class _Loaded:
    """What a reader hands to :func:`_finish`: data ``(C, X, Y, Z)``, affine 4x4 voxel -> RAS mm."""

    data: np.ndarray
    affine: np.ndarray
    source_format: str
    filename: str
    modality: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)
    keepalive: Any = None  # owner of a buffer that ``data`` views (a SimpleITK image), kept until the cast
    value_range: tuple[float, float] | None = None  # (min, max) of ``data`` when the reader already knows it


@dataclass(frozen=True)
class _Limits:
    """What one read may cost: element count, bytes (result + working copies), DICOM folder walk bounds."""

    max_voxels: int
    max_bytes: int | None
    out_dtype: np.dtype
    max_files: int = DEFAULT_MAX_FILES
    max_depth: int = DEFAULT_MAX_DEPTH


# ----------------------------------------------------------------------------------------------- public API
def load_image(source: str | os.PathLike | np.ndarray | Any, *, affine: np.ndarray | Any | None = None,
               series_uid: str | None = None, modality: str | None = None,
               max_voxels: int = 1_000_000_000, dtype: Any = np.float32,
               max_bytes: int | None = DEFAULT_MAX_BYTES, max_files: int = DEFAULT_MAX_FILES,
               max_depth: int = DEFAULT_MAX_DEPTH):
    """Read a scan into a channel-first ``MetaTensor`` ``(C, X, Y, Z)`` with a voxel -> RAS mm affine.

    Args:
        source: a path (NIfTI ``.nii``/``.nii.gz``, NRRD, MHA/MHD, DICOM file, PNG/JPEG), a folder of DICOM
            files (one series is read), or an array/tensor: ``(X, Y)``, ``(X, Y, Z)``, ``(1, X, Y, Z)``
            (a ``MetaTensor`` is taken as channel-first ``(C, X, Y[, Z])`` and keeps its affine).
        affine: 4x4 voxel -> world RAS mm, only for array input (default: identity, 1 mm voxels).
        series_uid: which DICOM series to read from a folder holding several (default: the largest).
        modality: overrides/declares the modality ("CT", "MR", ...); files that do not say get "unknown".
        max_voxels: refuse inputs whose header claims more elements than this (checked before reading).
        dtype: output dtype (CT values are HU after RescaleSlope/Intercept); refused when it cannot hold the
            values (e.g. HU into int8).
        max_bytes: memory budget in bytes for the result plus every working copy of the read (stored pixels,
            float working volume), computed from the header before anything is allocated; ``None``: no budget.
        max_files, max_depth: bounds of the walk through a DICOM folder (files seen, folder nesting).

    Returns:
        ``monai.data.MetaTensor``; meta keys: ``filename_or_obj``, ``source_format``, ``original_shape``,
        ``original_spacing`` (mm), ``original_affine`` (np 4x4 RAS), ``modality``, ``is_2d``, ``space="RAS"``,
        and ``series_uid`` for DICOM.

    Raises:
        RadFM3DInputError: missing/empty/unknown/corrupt input, 1D/4D/5D data, NaN/Inf voxels (also after
            scaling or the cast to ``dtype``), zero/negative or absurd spacing (also in a NIfTI's raw pixdim), a
            singular affine, a header larger than ``max_voxels`` or ``max_bytes``, a detached header (.mhd/.nhdr)
            pointing outside its folder, a DICOM folder beyond ``max_files``/``max_depth``.
    """
    try:
        out_dtype = np.dtype(dtype).newbyteorder("=")
    except TypeError as err:
        raise RadFM3DInputError(_ARRAY_SOURCE if _is_array(source) else source,
                                f"dtype={dtype!r} is not a numpy dtype ({_short(err)})") from None
    if out_dtype.kind not in "biuf":
        raise RadFM3DInputError(_ARRAY_SOURCE if _is_array(source) else source,
                                f"dtype={out_dtype} is not supported; use a bool, integer or float dtype")
    limits = _Limits(int(max_voxels), None if max_bytes is None else int(max_bytes), out_dtype, int(max_files),
                     int(max_depth))
    if _is_array(source):
        loaded = _read_array(source, affine, limits)
    else:
        if not isinstance(source, (str, os.PathLike)):
            raise RadFM3DInputError(repr(type(source)), "load_image expects a path, a folder, a numpy array or "
                                                        "a torch tensor")
        path = Path(os.fspath(source)).expanduser()
        if affine is not None:
            raise RadFM3DInputError(path, "affine= is only used for array input; a file carries its own geometry")
        loaded = _read_path(path, series_uid, limits)
    if modality:
        loaded.modality = str(modality)
    elif loaded.modality in (None, "", "unknown") and loaded.source_format in _UNTAGGED_FORMATS:
        _infer_ct_from_hu(loaded)
    return _finish(loaded, out_dtype)


# formats that carry no modality tag (DICOM does)
_UNTAGGED_FORMATS = ("nifti", "nrrd", "mha", "mhd")


def _infer_ct_from_hu(loaded: _Loaded) -> None:
    """Call an untagged volume CT when its values span air in Hounsfield units (<= -900) to tissue (>= 100).

    NIfTI/NRRD/MHA have no modality field, yet the CT recipe (HU windows) differs from the MR one (percentiles);
    guessing "unknown" would preprocess a CT differently at inference than in training from a tagged manifest.
    MR intensities are non-negative, so the air signature does not fire on them. ``modality=`` always wins.
    """
    data = loaded.data
    if data.size == 0 or data.dtype.kind not in "iuf":
        return
    lo, hi = float(data.min()), float(data.max())
    loaded.value_range = (lo, hi)  # reused by _finish's checks
    if lo <= -900.0 and hi >= 100.0:
        loaded.modality = "CT"
        loaded.extra["modality_inferred"] = (f"CT inferred from the value range [{lo:g}, {hi:g}] (air in HU); "
                                             "pass modality= to override")


def save_nifti(image: Any, path: str | os.PathLike) -> Path:
    """Write a ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) image with its RAS affine as NIfTI-1 (``.nii``/``.nii.gz``).

    One channel is stored as ``(X, Y, Z)``; several as a NIfTI vector image ``(X, Y, Z, 1, C)``, which
    :func:`load_image` reads back as channels. Both sform and qform are set (code 1, scanner), units mm.
    """
    nib = _require("nibabel", "nibabel")
    path = Path(os.fspath(path))
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise RadFM3DInputError(path, "save_nifti writes .nii or .nii.gz files")
    data, aff = _image_data_affine(image)
    if data.ndim == 4:
        data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)[:, :, :, None, :]
    data = _nifti_safe_dtype(data)
    nimg = nib.Nifti1Image(data, aff)
    nimg.header.set_xyzt_units("mm")
    nimg.set_sform(aff, code=1)
    nimg.set_qform(aff, code=1)
    if data.ndim == 5:
        nimg.header.set_intent("vector")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nimg, str(path))
    return path


def save_dicom_series(image: Any, folder: str | os.PathLike, *, modality: str = "CT", series_uid: str | None = None,
                      patient_id: str = "RADFM3D-ANON", description: str = "radfm3d",
                      study_uid: str | None = None) -> list[Path]:
    """Write a one-channel ``(1, X, Y, Z)`` image as a DICOM series, one file per Z slice.

    Geometry: ImagePositionPatient (LPS) of each slice, ImageOrientationPatient from the X (column) and Y
    (row) axes, PixelSpacing = ``[row spacing (Y), column spacing (X)]``, SliceThickness and
    SpacingBetweenSlices = the Z step. Pixels are int16 with RescaleSlope/Intercept: integer data that
    fits int16 (e.g. CT in HU) is stored exactly, anything else is scaled to the full int16 range.
    Storage class: CT/MR/PT Image Storage by ``modality``, Secondary Capture otherwise.

    Returns:
        the written paths, in Z order (``slice_0000.dcm`` ...).
    """
    _require("pydicom", "pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID,
                             PositronEmissionTomographyImageStorage, SecondaryCaptureImageStorage, generate_uid)

    folder = Path(os.fspath(folder))
    data, aff = _image_data_affine(image)
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise RadFM3DInputError(folder, f"save_dicom_series writes one channel, got {data.shape[0]}")
        data = data[0]
    if data.ndim != 3:
        raise RadFM3DInputError(folder, f"save_dicom_series expects (1, X, Y, Z) or (X, Y, Z), got {data.shape}")
    values = np.asarray(data, dtype=np.float64)
    if not np.isfinite(values).all():
        raise RadFM3DInputError(folder, "cannot save NaN/Inf voxels as DICOM")
    slope, intercept = _int16_rescale(values)
    stored = np.clip(np.rint((values - intercept) / slope), -32768, 32767).astype("<i2")

    lps = _LPS_RAS @ aff
    col_x, col_y, step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    sx, sy, sz = (float(np.linalg.norm(c)) for c in (col_x, col_y, step))
    if min(sx, sy, sz) <= 0:
        raise RadFM3DInputError(folder, "cannot save an image with zero voxel spacing as DICOM")
    row_dir, col_dir = col_x / sx, col_y / sy
    normal = np.cross(row_dir, col_dir)
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage,
                 "PT": PositronEmissionTomographyImageStorage}.get(modality.upper(), SecondaryCaptureImageStorage)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = stored.shape
    paths: list[Path] = []
    for k in range(nz):
        ipp = lps[:3, 3] + k * step
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality.upper()
        ds.Manufacturer = "radfm3d"
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = description[:64]
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = _ds(float(ipp @ normal))
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # [between rows (Y), between columns (X)]
        ds.SliceThickness = _ds(sz)
        ds.SpacingBetweenSlices = _ds(sz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = _ds(intercept)
        if ds.Modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # (Rows=Y, Columns=X)
        out = folder / f"slice_{k:04d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        paths.append(out)
    return paths


def image_summary(image: Any) -> dict[str, Any]:
    """A JSON-friendly description of a loaded image (what ``radfm3d info`` prints)."""
    nib = _require("nibabel", "nibabel")
    aff = np.asarray(_to_numpy(image.affine), dtype=np.float64)
    values = _to_numpy(image)
    meta = dict(getattr(image, "meta", {}) or {})
    summary = {
        "file": str(meta.get("filename_or_obj", "")),
        "format": meta.get("source_format", "unknown"),
        "shape": [int(s) for s in values.shape],
        "spacing_mm": [round(float(s), 6) for s in np.linalg.norm(aff[:3, :3], axis=0)],
        "orientation": "".join(nib.aff2axcodes(aff)),
        "origin_mm_ras": [round(float(v), 4) for v in aff[:3, 3]],
        "modality": meta.get("modality", "unknown"),
        "is_2d": bool(meta.get("is_2d", False)),
        "value_range": [float(values.min()), float(values.max())] if values.size else [],
        "dtype": str(values.dtype),
    }
    if "series_uid" in meta:
        summary["series_uid"] = meta["series_uid"]
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d info <path> [...]``: print format, shape, spacing, orientation, modality and value range."""
    parser = argparse.ArgumentParser(prog="radfm3d info", description="Read scans and print their geometry.")
    parser.add_argument("paths", nargs="+", help="image file(s) or DICOM folder(s)")
    parser.add_argument("--series-uid", default=None, help="DICOM series to read from a folder holding several")
    parser.add_argument("--modality", default=None, help="declare the modality (CT, MR, ...) for files that lack it")
    parser.add_argument("--max-voxels", type=int, default=1_000_000_000, help="refuse larger headers")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="memory budget of one read in bytes (result + working copies)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    with warnings.catch_warnings():  # import-time deprecation chatter of MONAI/torch, before any recording
        warnings.simplefilter("ignore")
        import monai.data  # noqa: F401
    status = 0
    for path in args.paths:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = load_image(path, series_uid=args.series_uid, modality=args.modality,
                                   max_voxels=args.max_voxels, max_bytes=args.max_bytes)
        except RadFM3DInputError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
            continue
        summary = image_summary(image)
        summary["warnings"] = data_warnings(caught)
        if args.json:
            print(json.dumps(summary))
            continue
        lo, hi = summary["value_range"] or [float("nan")] * 2
        lines = [f"file:        {summary['file']}", f"format:      {summary['format']}",
                 f"shape:       {tuple(summary['shape'])}  (C, X, Y, Z)",
                 f"spacing:     {' x '.join(f'{s:g}' for s in summary['spacing_mm'])} mm",
                 f"orientation: {summary['orientation']}  (voxel axes -> world, nibabel axcodes)",
                 f"origin:      {', '.join(f'{v:g}' for v in summary['origin_mm_ras'])} mm (RAS)",
                 f"modality:    {summary['modality']}", f"2D:          {'yes' if summary['is_2d'] else 'no'}",
                 f"values:      {lo:g} .. {hi:g} ({summary['dtype']})"]
        if "series_uid" in summary:
            lines.append(f"series UID:  {summary['series_uid']}")
        lines += [f"warning:     {w}" for w in summary["warnings"]]
        print("\n".join(lines))
    return status


_NOISE_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning, ResourceWarning)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def data_warnings(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """The warnings worth showing a user about their data: radfm3d's own, and any library warning that is not
    deprecation/import noise (e.g. pydicom on an invalid value); each distinct message once, in order."""
    kept: list[str] = []
    for w in caught:
        ours = os.path.abspath(str(w.filename or "")).startswith(_PACKAGE_DIR + os.sep)
        if not ours and issubclass(w.category, _NOISE_CATEGORIES):
            continue
        text = str(w.message)
        if text not in kept:
            kept.append(text)
    return kept


# ----------------------------------------------------------------------------------------------- dispatch
def _read_path(path: Path, series_uid: str | None, limits: _Limits) -> _Loaded:
    if not path.exists():
        raise RadFM3DInputError(path, "no such file or folder")
    if path.is_dir():
        return _read_dicom_folder(path, series_uid, limits)
    if path.stat().st_size == 0:
        raise RadFM3DInputError(path, "empty file (0 bytes)")
    fmt = _guess_format(path)
    if fmt == "nifti":
        return _read_nifti(path, limits)
    if fmt in ("nrrd", "mha"):
        return _read_itk(path, fmt, limits)
    if fmt == "dicom":
        return _read_dicom_file(path, limits, series_uid)
    return _read_pil(path, fmt, limits)


def _guess_format(path: Path) -> str:
    """Format from the extension, else from the first bytes; raises for anything else."""
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in _FORMAT_BY_SUFFIX:
        return _FORMAT_BY_SUFFIX[suffix]
    with open(path, "rb") as f:
        head = f.read(352)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    raise RadFM3DInputError(path, f"not a recognised image file (extension {suffix or 'none'!r}); "
                                  f"radfm3d reads {_KNOWN_EXTENSIONS}")


# ----------------------------------------------------------------------------------------------- NIfTI
def _read_nifti(path: Path, limits: _Limits) -> _Loaded:
    nib = _require("nibabel", "nibabel")
    try:
        img = nib.load(str(path))
    except Exception as err:  # ImageFileError, gzip/zlib errors, short headers
        raise RadFM3DInputError(path, f"not a readable NIfTI file: the header is missing or corrupt "
                                      f"({_short(err)})") from None
    if not hasattr(img, "affine") or not hasattr(img, "dataobj"):
        raise RadFM3DInputError(path, f"{type(img).__name__} is not a NIfTI/Analyze volume")
    pair = getattr(img.file_map.get("image"), "filename", None)
    if pair and os.path.abspath(pair) != os.path.abspath(path):  # .hdr/.img: the .img must lie in the same folder
        _check_inside(path, os.path.basename(pair))
    shape = tuple(int(s) for s in img.header.get_data_shape())
    spatial, channels = _file_layout(path, shape)
    header = img.header
    stored = np.dtype(header.get_data_dtype())
    slope, inter = _nifti_scaling(img.dataobj)
    scaled = (slope, inter) != (1.0, 0.0)
    # stored pixels + the result (+ a float32 working volume when scaled data are cast to an integer dtype)
    work = 4 if scaled and limits.out_dtype.kind != "f" else 0
    _check_voxels(path, shape, limits, stored.itemsize + work)
    _check_raw_pixdim(path, img)
    aff = np.asarray(img.affine, dtype=np.float64)
    if spatial[2] == 1 and len(shape) == 2:
        aff = _complete_2d_affine(aff)
    extra: dict[str, Any] = {}
    codes = (int(header.get("sform_code", 0)), int(header.get("qform_code", 0)))
    if codes == (0, 0):
        warnings.warn(f"{path}: NIfTI without sform/qform; the orientation is unknown and comes from pixdim only",
                      stacklevel=3)
        extra["geometry_known"] = False
    _check_affine(path, aff)
    if np.iscomplexobj(np.empty(0, stored)) or stored.fields is not None:
        raise RadFM3DInputError(path, f"unsupported NIfTI data type {stored} (complex/RGB)")
    try:
        data = _fast_gzip_nifti_data(path, img)
        if data is None:
            data = np.asanyarray(img.dataobj.get_unscaled()) if scaled else np.asanyarray(img.dataobj)
    except FileNotFoundError as err:
        raise RadFM3DInputError(path, f"the pixel data file {err.filename!r} is missing") from None
    except MemoryError:
        raise RadFM3DInputError(path, _no_memory_message(shape, stored.itemsize + limits.out_dtype.itemsize,
                                                         limits)) from None
    except Exception as err:  # EOFError, zlib.error, OSError, ValueError from short data
        raise RadFM3DInputError(path, f"corrupt or truncated NIfTI file: the pixel data could not be read "
                                      f"({_short(err)})") from None
    if np.iscomplexobj(data) or data.dtype.fields is not None:
        raise RadFM3DInputError(path, f"unsupported NIfTI data type {header.get_data_dtype()} (complex/RGB)")
    if scaled:
        data = _apply_scaling(path, data, slope, inter, limits.out_dtype)
    data = data.reshape(*spatial, -1) if len(shape) == 5 else data.reshape(spatial)[..., None]
    return _Loaded(np.moveaxis(data, -1, 0), aff, "nifti", str(path), extra=extra)


def _nifti_scaling(proxy: Any) -> tuple[float, float]:
    """(scl_slope, scl_inter) as nibabel interprets them (0/NaN slope: unscaled) -> (1.0, 0.0) when unscaled."""
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    slope = 1.0 if slope is None or (np.isfinite(slope) and slope == 0) else float(slope)
    inter = 0.0 if inter is None else float(inter)
    if np.isnan(slope):
        slope = 1.0
    if np.isnan(inter):
        inter = 0.0
    return slope, inter


def _apply_scaling(path: Path, raw: np.ndarray, slope: float, inter: float, out_dtype: np.dtype) -> np.ndarray:
    """``raw * slope + inter`` in float64, stored straight into a float array (the output dtype if it is a float,
    else float32), a chunk at a time: one full-size copy beyond the stored pixels, never a float64 volume.

    Why not nibabel's scaling: it builds a float64 volume (2x a float32 result) and the later float32 cast can then
    overflow to Inf unnoticed. Raises if the scaled values do not fit (overflow to Inf) or are NaN.
    """
    work = out_dtype if out_dtype.kind == "f" else np.dtype(np.float32)
    out = np.empty_like(raw, dtype=work)  # same memory layout as raw, so both ravel to views
    flat_in, flat_out = raw.ravel(order="K"), out.ravel(order="K")
    assert np.shares_memory(flat_out, out)
    chunk = 1 << 22
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, flat_in.size, chunk):
            part = flat_in[start:start + chunk].astype(np.float64)
            part *= slope
            part += inter
            flat_out[start:start + chunk] = part
    if out.size:
        lo, hi = out.min(), out.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(flat_out)))
            raise RadFM3DInputError(path, f"scaling the stored values by scl_slope={slope:g}, scl_inter={inter:g} "
                                          f"gives {bad:,} of {out.size:,} voxels that are Inf/NaN in {work} "
                                          "(overflow); the header's scaling is broken")
    return out


def _check_raw_pixdim(path: Path, img: Any) -> None:
    """Refuse zero/negative/NaN voxel sizes in the header *as stored*: nibabel replaces them (abs(), 0 -> 1) while
    loading, so ``img.header`` no longer shows them."""
    nib = _require("nibabel", "nibabel")
    try:
        holder = img.file_map.get("header") or img.file_map.get("image")  # .hdr of a pair, else the .nii
        name = getattr(holder, "filename", None) or str(path)
        with nib.openers.ImageOpener(name) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        dims = [int(d) for d in raw["dim"]]
        pixdim = [float(v) for v in raw["pixdim"]]
    except Exception:  # the header was parsed once already; nothing more to learn here
        return
    ndim = max(0, min(dims[0], 3))
    bad = [(i, pixdim[i]) for i in range(1, ndim + 1) if not np.isfinite(pixdim[i]) or pixdim[i] <= 0]
    if bad:
        listing = ", ".join(f"pixdim[{i}]={v:g}" for i, v in bad)
        raise RadFM3DInputError(path, f"zero or negative voxel spacing in the header ({listing} mm); the header is "
                                      "broken (nibabel would silently replace it)")


def _fast_gzip_nifti_data(path: Path, img: Any) -> np.ndarray | None:
    """Unscaled voxel array of a ``.nii.gz`` through ISA-L's gzip (``isal``), or None to use nibabel's reader.

    Why not nibabel alone: it inflates with Python's zlib, which made reading a 512x512x300 CT ~85% of the whole
    load+preprocess time; ISA-L inflates the same stream about 5-10x faster. The header (shape, affine, dtype,
    offset) still comes from nibabel; only the inflate differs, and the bytes are viewed, not copied (the cast to the
    output dtype is the one copy). Raises EOFError/OSError on truncated or corrupt streams.
    """
    if not str(path).lower().endswith(".gz"):
        return None
    try:
        from isal import igzip
    except ImportError:  # optional speed-up; nibabel's reader gives the same values
        return None
    proxy = img.dataobj
    # the ArrayProxy knows where the voxels really start (a NIfTI-1 header may say vox_offset 0) and their layout
    dtype, offset, order = np.dtype(proxy.dtype), int(proxy.offset), getattr(proxy, "order", "F")
    shape = tuple(int(s) for s in proxy.shape)
    count = int(np.prod(shape)) if shape else 0
    total = offset + count * dtype.itemsize
    with igzip.open(str(path), "rb") as stream:
        raw = stream.read(total)  # one bytes object (read() is ~1.5x faster than readinto() a bytearray here)
    if len(raw) < total:
        raise EOFError(f"pixel data ends after {max(len(raw) - offset, 0):,} of {count * dtype.itemsize:,} bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order=order)


def _file_layout(source: Any, shape: tuple[int, ...]) -> tuple[tuple[int, int, int], int]:
    """File shape (spatial first, vector last) -> ((X, Y, Z), channels); raises for 1D/4D/5D."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) <= 1:
        raise RadFM3DInputError(source, f"1D data (shape {tuple(shape)}) is not an image; radfm3d reads 2D and "
                                        "3D images")
    if len(dims) == 2:
        return (dims[0], dims[1], 1), 1
    if len(dims) == 3:
        return (dims[0], dims[1], dims[2]), 1
    if len(dims) == 4:
        raise RadFM3DInputError(source, _four_d_message(dims[3], shape))
    if len(dims) == 5 and dims[3] == 1:  # NIfTI vector convention (X, Y, Z, 1, C)
        return (dims[0], dims[1], dims[2]), dims[4]
    raise RadFM3DInputError(source, f"{len(dims)}D data (shape {tuple(shape)}) is not supported; radfm3d reads "
                                    "2D and 3D images")


def _four_d_message(volumes: int, shape: Sequence[int]) -> str:
    return (f"4D image with {volumes} volumes (time/echo), shape {tuple(int(s) for s in shape)}; radfm3d reads "
            "one 3D volume at a time: select one volume, e.g. load_image(arr[..., t], affine=...)")


# ----------------------------------------------------------------------------------------------- NRRD / MHA
_HEADER_SCAN_BYTES = 1 << 20  # a text header longer than 1 MiB is not a header


def detached_data_files(path: str | os.PathLike) -> list[str]:
    """The data files a MetaImage (``.mha``/``.mhd``: ``ElementDataFile``) or NRRD (``.nrrd``/``.nhdr``:
    ``data file``) header points at, as written in the header (relative to its folder); ``[]`` when the voxels are
    in the header's own file (``LOCAL``, attached NRRD) or the file is neither format.

    Covers the single-file, ``LIST`` and printf-pattern (``name%03d.raw min max step``) forms of both formats.
    """
    path = Path(os.fspath(path))
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_SCAN_BYTES)
    except OSError:
        return []
    if head.startswith(b"NRRD"):
        return _nrrd_data_files(head)
    return _metaimage_data_files(head)


def _text_lines(head: bytes) -> list[str]:
    return head.decode("latin-1").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _pattern_files(pattern: str, lo: str, hi: str, step: str) -> list[str]:
    """``pattern % i`` for i in lo..hi (inclusive) by step; at most DEFAULT_MAX_FILES names."""
    try:
        a, b, c = int(lo), int(hi), int(step)
    except ValueError:
        return [pattern]
    if c == 0 or (b - a) / c < 0:
        return [pattern % a] if "%" in pattern else [pattern]
    count = (b - a) // c + 1
    if count > DEFAULT_MAX_FILES:
        raise ValueError(f"the file pattern {pattern!r} names {count:,} files")
    try:
        return [pattern % i for i in range(a, b + (1 if c > 0 else -1), c)]
    except (TypeError, ValueError):
        return [pattern]


def _metaimage_data_files(head: bytes) -> list[str]:
    lines = _text_lines(head)
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if not sep or key.strip().lower() != "elementdatafile":
            continue
        value = value.strip()
        if value.upper() == "LOCAL":
            return []
        if value.upper().startswith("LIST"):
            return [ln.strip() for ln in lines[i + 1:] if ln.strip() and "\x00" not in ln]
        parts = value.split()
        if len(parts) == 4 and "%" in parts[0]:
            return _pattern_files(*parts)
        return [value]
    return []


def _nrrd_data_files(head: bytes) -> list[str]:
    text = head.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]  # the header ends at the first blank line
    lines = _text_lines(text)
    for i, line in enumerate(lines):
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or key.strip().lower() not in ("data file", "datafile"):
            continue
        value = value.strip().lstrip("=").strip()
        if value.upper().startswith("LIST"):
            return [ln.strip() for ln in lines[i + 1:] if ln.strip()]
        parts = value.split()
        if len(parts) in (4, 5) and "%" in parts[0]:
            return _pattern_files(*parts[:4])
        return [value]
    return []


def _check_detached(path: Path) -> None:
    """Refuse a header whose data file(s) resolve (symlinks followed) outside the header's own folder."""
    try:
        names = detached_data_files(path)
    except ValueError as err:
        raise RadFM3DInputError(path, f"{err}; refusing to read so many data files") from None
    if not names:
        return
    for name in names:
        _check_inside(path, name)


def _check_inside(path: Path, name: str) -> None:
    """Refuse a data file ``name`` (relative to ``path``'s folder, or absolute) that resolves outside that folder."""
    base = os.path.realpath(path.parent)
    target = os.path.realpath(os.path.join(path.parent, name))
    if os.path.commonpath([base, target]) != base:
        raise RadFM3DInputError(path, f"the header points at the data file {name!r}, which resolves to "
                                      f"{target!r}, outside the header's folder {base!r}; a detached header may "
                                      "only name files in its own folder or below, so nothing was read")


def _read_itk(path: Path, fmt: str, limits: _Limits) -> _Loaded:
    sitk = _require("SimpleITK", "SimpleITK")
    _check_detached(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise RadFM3DInputError(path, f"not a readable {fmt.upper()} file: the header is missing or corrupt "
                                      f"({_short(err)})") from None
    size = [int(s) for s in reader.GetSize()]
    comps = int(reader.GetNumberOfComponents())
    shape = tuple(size) + ((comps,) if comps > 1 else ())
    dims = list(size)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) <= 1:
        raise RadFM3DInputError(path, f"1D data (size {tuple(size)}) is not an image")
    if len(dims) == 4:
        raise RadFM3DInputError(path, _four_d_message(dims[3], size))
    if len(dims) > 4:
        raise RadFM3DInputError(path, f"{len(dims)}D data (size {tuple(size)}) is not supported")
    stored = _sitk_itemsize(sitk, reader.GetPixelID())
    # ITK's buffer (stored type) + the result; a compressed file is also held whole while it is inflated
    _check_voxels(path, shape, limits, stored, extra_bytes=path.stat().st_size)
    _check_spacing_values(path, reader.GetSpacing(), "spacing")
    nd = len(size)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(nd, nd)
    lps = np.eye(4)
    k = min(nd, 3)
    lps[:k, :k] = direction[:k, :k] * np.asarray(reader.GetSpacing()[:k])
    lps[:k, 3] = np.asarray(reader.GetOrigin()[:k])
    aff = _LPS_RAS @ lps
    if len(dims) == 2:
        aff = _complete_2d_affine(aff)
    _check_affine(path, aff)
    try:
        image = reader.Execute()
    except MemoryError:
        raise RadFM3DInputError(path, _no_memory_message(shape, stored + limits.out_dtype.itemsize, limits)) from None
    except RuntimeError as err:
        if "alloc" in str(err).lower():
            raise RadFM3DInputError(path, _no_memory_message(shape, stored + limits.out_dtype.itemsize,
                                                             limits)) from None
        raise RadFM3DInputError(path, f"corrupt or truncated {fmt.upper()} file: the pixel data could not be read "
                                      f"({_short(err)})") from None
    arr = sitk.GetArrayViewFromImage(image)  # (..., Z, Y, X[, C]) view of ITK's buffer (kept alive below)
    if comps == 1:
        arr = arr[..., None]
    arr = arr.reshape(*[s for s in reversed(size[:3])], comps)  # drops singleton 4th dims
    data = np.moveaxis(arr, -1, 0).transpose(0, *range(arr.ndim - 1, 0, -1))
    if data.ndim == 3:  # 2D: (C, X, Y) -> (C, X, Y, 1)
        data = data[..., None]
    return _Loaded(data, aff, fmt, str(path), keepalive=image)


def _sitk_itemsize(sitk: Any, pixel_id: int) -> int:
    """Bytes per component of a SimpleITK pixel type (8 if unknown: the largest scalar)."""
    try:
        return int(np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype).itemsize)
    except Exception:
        return 8


# ----------------------------------------------------------------------------------------------- DICOM
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg  (Pillow cannot decode 12-bit JPEG)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg  (or pyjpegls)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg  (or pyjpegls)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg  (or pillow)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg  (or pillow)",
}
_ENHANCED_MARKERS = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")


def _dcmread(path: Path, *, header_only: bool, force: bool = False):
    pydicom = _require("pydicom", "pydicom")
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=header_only, force=force)
    except InvalidDicomError:
        if force:
            raise
        raise RadFM3DInputError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except MemoryError:
        raise RadFM3DInputError(path, _OUT_OF_MEMORY) from None
    except Exception as err:
        raise RadFM3DInputError(path, f"corrupt or truncated DICOM file ({_short(err)})") from None


def _header_and_offset(path: Path) -> tuple[Any, int]:
    """(header without pixel data, file offset of the pixel data element) with _dcmread's clear errors."""
    pydicom = _require("pydicom", "pydicom")
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            return ds, fp.tell()  # pydicom rewinds to the start of the pixel data element it stopped at
    except InvalidDicomError:
        raise RadFM3DInputError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except MemoryError:
        raise RadFM3DInputError(path, _OUT_OF_MEMORY) from None
    except Exception as err:
        raise RadFM3DInputError(path, f"corrupt or truncated DICOM file ({_short(err)})") from None


def _read_dicom_file(path: Path, limits: _Limits, series_uid: str | None = None) -> _Loaded:
    header, offset = _header_and_offset(path)
    if "Rows" not in header or "Columns" not in header:
        raise RadFM3DInputError(path, f"DICOM file without an image ({_sop_name(header)}); not an image")
    if series_uid and header.get("SeriesInstanceUID") != series_uid:
        raise RadFM3DInputError(path, f"series_uid {series_uid!r} asked for, but this file belongs to series "
                                      f"{header.get('SeriesInstanceUID')!r}")
    frames = _num_frames(header)
    if frames > 1 or any(m in header for m in _ENHANCED_MARKERS):
        return _read_dicom_multiframe(path, header, limits, offset)
    return _read_dicom_single(path, header, limits)


def _stored_itemsize(ds: Any) -> int:
    try:
        return max(1, int(ds.get("BitsAllocated", 16) or 16) // 8)
    except (TypeError, ValueError):
        return 2


def _read_dicom_single(path: Path, header: Any, limits: _Limits) -> _Loaded:
    rows, cols = int(header.Rows), int(header.Columns)
    # the file read whole + decoded pixels + a float32 working image + the result
    _check_voxels(path, (cols, rows, int(header.get("SamplesPerPixel", 1) or 1)), limits,
                  _stored_itemsize(header) + 4, extra_bytes=path.stat().st_size)
    ipp, iop = _vec(header, "ImagePositionPatient", 3), _vec(header, "ImageOrientationPatient", 6)
    spacing = _pixel_spacing(path, header)
    thickness = _first_float(header, "SliceThickness", "SpacingBetweenSlices") or 1.0
    row_dir, col_dir = (iop[:3], iop[3:]) if iop is not None else (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    step = np.cross(row_dir, col_dir) * thickness
    aff = _dicom_affine(ipp if ipp is not None else np.zeros(3), row_dir, col_dir, spacing, step)
    _check_affine(path, aff)
    ds = _dcmread(path, header_only=False)
    pixels = _grey(path, ds, _decode(path, ds))
    if pixels.shape != (rows, cols):
        raise RadFM3DInputError(path, f"pixel data has shape {pixels.shape}, header says {(rows, cols)}")
    slope, intercept = _rescale_of(ds)
    values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    values = _maybe_invert(ds, values)
    extra = {"series_uid": str(ds.get("SeriesInstanceUID", "")), "geometry_known": iop is not None}
    return _Loaded(values.T[None, :, :, None], aff, "dicom", str(path), _modality_of(ds), extra)


@dataclass
class _SliceHeader:
    path: Path
    ds: Any
    pixel_offset: int = -1  # file offset of the (7FE0,0010) element, -1 if unknown


def dicom_folder_files(folder: str | os.PathLike, max_files: int = DEFAULT_MAX_FILES,
                       max_depth: int = DEFAULT_MAX_DEPTH) -> list[Path]:
    """Every file a DICOM folder read looks at, sorted: hidden files/folders and DICOMDIR skipped, symlinked folders
    not followed. Raises :class:`RadFM3DInputError` past ``max_files`` files or ``max_depth`` nested folders, so a
    mistaken root (``/``, a whole archive) fails fast instead of being walked for hours."""
    root = Path(os.fspath(folder))
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = os.path.relpath(dirpath, root)
        depth = 0 if rel == os.curdir else rel.count(os.sep) + 1
        if depth > max_depth:
            raise RadFM3DInputError(root, f"folders nested more than max_depth={max_depth} levels deep (e.g. "
                                          f"{rel}); point at the series folder, or pass a larger max_depth")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            found.append(Path(dirpath) / name)
            if len(found) > max_files:
                raise RadFM3DInputError(root, f"more than max_files={max_files:,} files in this folder tree; point "
                                              "at the series folder, or pass a larger max_files")
    return sorted(found)


def _read_header_with_offset(path: Path) -> _SliceHeader | None:
    """Header (pixel data not read) and the pixel data element's file offset; None for non-DICOM/non-image files."""
    try:
        ds, offset = _header_and_offset(path)
    except RadFM3DInputError:  # not DICOM, unreadable, truncated header: skipped like any other stray file
        return None
    if "Rows" not in ds or "Columns" not in ds:
        return None
    return _SliceHeader(path, ds, offset)


def _read_dicom_folder(folder: Path, series_uid: str | None, limits: _Limits) -> _Loaded:
    files = dicom_folder_files(folder, limits.max_files, limits.max_depth)
    headers: list[_SliceHeader] = []
    for f in files:
        try:
            if not f.is_file() or f.stat().st_size == 0:
                continue
        except OSError:
            continue
        h = _read_header_with_offset(f)
        if h is not None:
            headers.append(h)
    if not headers:
        raise RadFM3DInputError(folder, f"no DICOM images in this folder ({len(files)} files looked at, none is a "
                                        "readable DICOM image)")
    series: dict[str, list[_SliceHeader]] = {}
    for h in headers:
        series.setdefault(str(h.ds.get("SeriesInstanceUID", "unknown")), []).append(h)
    listing = "; ".join(f"{uid} ({len(v)} files, {v[0].ds.get('Modality', '?')}, "
                        f"{str(v[0].ds.get('SeriesDescription', '')) or 'no description'!r})"
                        for uid, v in sorted(series.items(), key=lambda kv: -len(kv[1])))
    if series_uid is not None:
        if series_uid not in series:
            raise RadFM3DInputError(folder, f"series_uid {series_uid!r} is not in this folder; it holds: {listing}")
        chosen = series_uid
    else:
        chosen = max(sorted(series), key=lambda uid: _series_size(series[uid]))
        if len(series) > 1:
            msg = (f"{folder}: {len(series)} DICOM series in this folder; reading the largest, {chosen} "
                   f"(pass series_uid= to choose another). Series found: {listing}")
            warnings.warn(msg, stacklevel=3)
            logger.info(msg)
    slices = series[chosen]
    if len(slices) == 1:
        one = slices[0]
        if _num_frames(one.ds) > 1 or any(m in one.ds for m in _ENHANCED_MARKERS):
            return _read_dicom_multiframe(one.path, one.ds, limits, one.pixel_offset)
        loaded = _read_dicom_single(one.path, one.ds, limits)
        loaded.source_format, loaded.filename = "dicom-series", str(folder)
        return loaded
    return _read_dicom_slices(folder, chosen, slices, limits)


def _series_size(slices: list[_SliceHeader]) -> int:
    return sum(_num_frames(s.ds) for s in slices)


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit / Explicit VR Little Endian


def _native_pixel_layout(s: _SliceHeader, rows: int, cols: int) -> tuple[np.dtype, int] | None:
    """(stored dtype, shift of unused high bits) when the pixels can be read straight from the file:
    uncompressed little-endian, one grey sample, 8/16/32 bits; None otherwise (pydicom decodes it)."""
    ds = s.ds
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts not in _NATIVE_LE or s.pixel_offset < 0 or "PixelData" in ds:
        return None
    try:
        bits, stored_bits = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if bits not in (8, 16, 32) or samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    if not 0 < stored_bits <= bits:
        return None
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}"), bits - stored_bits


def _read_native_pixels(s: _SliceHeader, dtype: np.dtype, shift: int, rows: int, cols: int,
                        buf: bytearray, frame: int = 0, frames: int = 1) -> np.ndarray | None:
    """The (rows, cols) stored pixels of frame ``frame`` (of ``frames``) of an uncompressed little-endian file,
    read into ``buf`` (no pydicom parse of the pixel element); None if the element there is not a plain PixelData
    holding all frames.

    Why not ``ds.pixel_array``: that re-parses the whole dataset and copies the pixel bytes twice per slice, which
    made a 300-slice CT read ~3x slower than GDCM; the header pass already knows where the pixels start.
    """
    need = rows * cols * dtype.itemsize
    explicit = str(s.ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1"
    with open(s.path, "rb") as f:
        f.seek(s.pixel_offset)
        head = f.read(12 if explicit else 8)
        if len(head) < 8 or head[:4] != b"\xe0\x7f\x10\x00":
            return None
        if explicit:
            if len(head) < 12 or head[4:6] not in (b"OW", b"OB"):
                return None
            length = int.from_bytes(head[8:12], "little")
        else:
            length = int.from_bytes(head[4:8], "little")
        if length == 0xFFFFFFFF or length < need * frames:
            return None
        if frame:
            f.seek(need * frame, os.SEEK_CUR)
        view = memoryview(buf)[:need]
        got = f.readinto(view)
        view.release()
    if got != need:
        return None
    pixels = np.frombuffer(buf, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if shift:  # unused high bits: mask (unsigned) or sign-extend (signed), as pydicom does
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)
    return pixels


def _read_dicom_slices(folder: Path, uid: str, slices: list[_SliceHeader], limits: _Limits) -> _Loaded:
    """Several single-frame files of one series -> one volume sorted along the slice normal.

    The float32 volume is allocated once, slice-major (Z, Y, X), and every slice's stored pixels are read straight
    into a small reusable buffer and rescaled into their plane (in place); the result is its (X, Y, Z) view, so
    reading holds the result plus one slice. Compressed or unusual slices go through pydicom's decoder.
    """
    multi = [s.path.name for s in slices if _num_frames(s.ds) > 1]
    if multi:
        raise RadFM3DInputError(folder, f"series {uid} mixes {len(multi)} multi-frame files (e.g. {multi[0]}) with "
                                        "other files; load the multi-frame file on its own")
    # keep the largest group of slices sharing size and orientation (drops localizers/scouts)
    groups: dict[tuple, list[_SliceHeader]] = {}
    for s in slices:
        iop = _vec(s.ds, "ImageOrientationPatient", 6)
        key = (int(s.ds.Rows), int(s.ds.Columns), None if iop is None else tuple(np.round(iop, 4)))
        groups.setdefault(key, []).append(s)
    key = max(groups, key=lambda k: len(groups[k]))
    if len(groups) > 1:
        left_out = len(slices) - len(groups[key])
        warnings.warn(f"{folder}: series {uid}: {left_out} image(s) with another size or orientation (e.g. a "
                      f"localizer) left out; reading {len(groups[key])} slices of {key[0]}x{key[1]}", stacklevel=4)
    slices = groups[key]
    rows, cols, _ = key
    work = 4 if limits.out_dtype != np.float32 else 0  # the float32 volume, when the result is another dtype
    _check_voxels(folder, (cols, rows, len(slices)), limits, work, extra_bytes=rows * cols * 64)  # slice buffers
    first = slices[0].ds
    iop = _vec(first, "ImageOrientationPatient", 6)
    ipps = [_vec(s.ds, "ImagePositionPatient", 3) for s in slices]
    if iop is None or any(p is None for p in ipps):
        raise RadFM3DInputError(folder, f"series {uid} lacks ImagePositionPatient/ImageOrientationPatient, so its "
                                        "slices cannot be placed in space")
    row_dir, col_dir = iop[:3], iop[3:]
    order, step = _sort_slices(folder, np.array(ipps), row_dir, col_dir, [s.path.name for s in slices])
    slices = [slices[i] for i in order]
    spacing = _pixel_spacing(folder, first)
    aff = _dicom_affine(ipps[order[0]], row_dir, col_dir, spacing, step)
    _check_affine(folder, aff)
    try:
        volume = np.empty((len(slices), rows, cols), dtype=np.float32)
    except MemoryError:
        raise RadFM3DInputError(folder, _no_memory_message((cols, rows, len(slices)), 4 + work, limits)) from None

    def fill(zs: range) -> tuple[float, float]:
        """Read slices ``zs`` into their planes; -> (min, max) of the values written (NaN propagates)."""
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing rescale is reported by _finish
            return fill_planes(zs)

    def fill_planes(zs: range) -> tuple[float, float]:
        buf = bytearray(rows * cols * 4)
        lo, hi = np.float32(np.inf), np.float32(-np.inf)
        for z in zs:
            s = slices[z]
            layout = _native_pixel_layout(s, rows, cols)
            pixels = None if layout is None else _read_native_pixels(s, *layout, rows, cols, buf)
            ds, native = s.ds, pixels is not None
            if pixels is None:
                ds = _dcmread(s.path, header_only=False)
                pixels = _grey(s.path, ds, _decode(s.path, ds))
                if pixels.shape != (rows, cols):
                    raise RadFM3DInputError(s.path, f"pixel data has shape {pixels.shape}, header says "
                                                    f"{(rows, cols)}")
            slope, intercept = _rescale_of(ds)
            s32, i32 = np.float32(slope), np.float32(intercept)
            plane = volume[z]
            # float32 arithmetic identical to pixels.astype(float32) * slope + intercept, in place, no temporaries
            if slope != 1.0:
                np.multiply(pixels, s32, out=plane, dtype=np.float32)
            else:
                plane[...] = pixels
            if intercept != 0.0:
                np.add(plane, i32, out=plane)
            if native:
                # the range from the stored integers (half the bytes): x -> x * slope + intercept is monotonic in
                # float32 too, so its extremes are the images of the stored extremes (swapped if slope < 0)
                ends = np.array([pixels.min(), pixels.max()], dtype=np.float32)
                if slope != 1.0:
                    ends *= s32
                if intercept != 0.0:
                    ends += i32
                a, b = (ends[1], ends[0]) if slope < 0 else (ends[0], ends[1])
            else:
                a, b = plane.min(), plane.max()
            lo, hi = np.minimum(lo, a), np.maximum(hi, b)
        return float(lo), float(hi)

    # file reads and numpy's arithmetic release the GIL: a few threads overlap them (SimpleITK/GDCM uses threads too)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(4, cores, len(slices) // 8))
    chunks = [range(k, len(slices), workers) for k in range(workers)]
    if workers == 1:
        ranges = [fill(chunks[0])]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix="radfm3d-dicom") as pool:
            ranges = list(pool.map(fill, chunks))
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if any(np.isnan(r[0]) or np.isnan(r[1]) for r in ranges) or not (np.isfinite(lo) and np.isfinite(hi)):
        raise RadFM3DInputError(folder, f"series {uid}: the pixel values after RescaleSlope/RescaleIntercept include "
                                        "NaN or Inf (beyond float32); the files' rescale values are broken")
    data = volume.transpose(2, 1, 0)  # (X, Y, Z) view of the (Z, Y, X) buffer
    inverted = _maybe_invert(slices[-1].ds, data)
    value_range = (lo, hi) if inverted is data else None
    extra = {"series_uid": uid, "num_files": len(slices)}
    return _Loaded(inverted[None], aff, "dicom-series", str(folder), _modality_of(first), extra,
                   value_range=value_range)


def _sort_slices(source: Any, ipps: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray,
                 labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Order slices by position along the normal; check for duplicates/gaps. -> (order, step vector in LPS mm)."""
    normal = np.cross(row_dir, col_dir)
    pos = ipps @ normal
    order = np.argsort(pos, kind="stable")
    pos_sorted = pos[order]
    gaps = np.diff(pos_sorted)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise RadFM3DInputError(source, f"{dup.size} duplicate slice position(s) "
                                        f"({labels[order[i]]} and {labels[order[i + 1]]} both at "
                                        f"{pos_sorted[i]:.4g} mm along the slice normal): duplicate files, or "
                                        "several echoes/time points/stacks in one series; remove the duplicates "
                                        "or split the series")
    if gaps.size:
        med = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - med) > max(0.01, 0.02 * med))
        if bad.size:
            i = int(bad[0])
            raise RadFM3DInputError(source, f"inconsistent spacing between slices: most are {med:.4g} mm apart, but "
                                            f"{labels[order[i]]} and {labels[order[i + 1]]} are {gaps[i]:.4g} mm apart "
                                            f"({bad.size} irregular gap(s)); a missing slice, or slices from "
                                            "different acquisitions?")
    if len(ipps) > 1:
        step = (ipps[order[-1]] - ipps[order[0]]) / (len(ipps) - 1)
    else:
        step = normal
    return order, step


def _read_dicom_multiframe(path: Path, header: Any, limits: _Limits, pixel_offset: int = -1) -> _Loaded:
    """Enhanced (functional groups), RT dose (GridFrameOffsetVector) or volumetric multi-frame DICOM."""
    frames, rows, cols = _num_frames(header), int(header.Rows), int(header.Columns)
    native = _native_pixel_layout(_SliceHeader(path, header, pixel_offset), rows, cols)
    if native is not None:  # frames read one at a time into the float32 volume (+ the result if another dtype)
        _check_voxels(path, (cols, rows, frames), limits, 4 if limits.out_dtype != np.float32 else 0,
                      extra_bytes=rows * cols * 4)
    else:  # the file read whole + decoded frames + the float32 frames (+ a re-ordered copy) + the result
        _check_voxels(path, (cols, rows, frames, int(header.get("SamplesPerPixel", 1) or 1)), limits,
                      _stored_itemsize(header) + 8, extra_bytes=path.stat().st_size)
    per_frame = list(header.get("PerFrameFunctionalGroupsSequence", []) or [])
    shared = (header.get("SharedFunctionalGroupsSequence") or [None])[0]

    def group_value(i: int, seq: str, attr: str, top_level: bool = True):
        """Per-frame functional group, else shared group, else (if ``top_level``) the top-level attribute."""
        for item in ((per_frame[i] if i < len(per_frame) else None), shared):
            if item is not None and seq in item and len(item[seq].value) and attr in item[seq].value[0]:
                return item[seq].value[0][attr].value
        return header.get(attr) if top_level else None

    ipps = [group_value(i, "PlanePositionSequence", "ImagePositionPatient", top_level=False) for i in range(frames)]
    top_ipp = _vec(header, "ImagePositionPatient", 3)
    iops = [group_value(i, "PlaneOrientationSequence", "ImageOrientationPatient") for i in range(frames)]
    spacing_values = group_value(0, "PixelMeasuresSequence", "PixelSpacing")
    thickness = (_as_float(group_value(0, "PixelMeasuresSequence", "SpacingBetweenSlices"))
                 or _as_float(group_value(0, "PixelMeasuresSequence", "SliceThickness")))
    extra: dict[str, Any] = {"series_uid": str(header.get("SeriesInstanceUID", "")), "geometry_known": True}
    iop0 = iops[0]
    if iop0 is not None:
        iop_arr = np.array([[float(v) for v in iop] if iop is not None else [np.nan] * 6 for iop in iops])
        if np.nanmax(np.abs(iop_arr - iop_arr[0])) > 1e-4 or np.isnan(iop_arr).any():
            raise RadFM3DInputError(path, "frames have different orientations (several stacks in one file); "
                                          "radfm3d reads one stack at a time")
        row_dir, col_dir = iop_arr[0, :3], iop_arr[0, 3:]
    else:
        row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    normal = np.cross(row_dir, col_dir)
    offsets = header.get("GridFrameOffsetVector")
    if all(p is not None for p in ipps) and (frames > 1 or len(per_frame)):
        positions = np.array([[float(v) for v in p] for p in ipps])
        labels = [f"frame {i + 1}" for i in range(frames)]
        order, step = _sort_slices(path, positions, row_dir, col_dir, labels)
        if frames == 1:
            step = normal * (thickness or 1.0)
        origin = positions[order[0]]
    elif offsets is not None and top_ipp is not None and len(offsets) == frames:  # RT dose grid
        positions = top_ipp + np.outer([float(v) for v in offsets], normal)
        order, step = _sort_slices(path, positions, row_dir, col_dir, [f"frame {i + 1}" for i in range(frames)])
        origin = positions[order[0]]
    elif str(header.get("VolumetricProperties", "")).upper() == "VOLUME" or \
            str(header.get("MRAcquisitionType", "")).upper() == "3D":
        order = np.arange(frames)
        step = normal * (thickness or 1.0)
        origin = top_ipp if top_ipp is not None else np.zeros(3)
        extra["geometry_known"] = False
        warnings.warn(f"{path}: multi-frame volume without per-frame positions; frames are stacked in file order "
                      f"{thickness or 1.0:g} mm apart with {'the given' if iop0 is not None else 'identity'} "
                      "orientation", stacklevel=4)
    else:
        raise RadFM3DInputError(path, f"DICOM with {frames} frames but no per-frame positions (a cine/time series, "
                                      "not a volume); select one frame, e.g. load_image(frames[t].T, affine=...)")
    spacing = _pixel_spacing(path, header, spacing_values)
    aff = _dicom_affine(origin, row_dir, col_dir, spacing, step)
    _check_affine(path, aff)

    def rescale(i: int) -> tuple[float, float]:
        slope = _as_float(group_value(i, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _as_float(group_value(i, "PixelValueTransformationSequence", "RescaleIntercept"))
        return (1.0 if slope is None else slope), (intercept or 0.0)

    if native is not None:
        volume = _read_native_frames(path, header, pixel_offset, native, order, rows, cols, rescale)
        if volume is not None:
            volume = _maybe_invert(header, volume)
            return _Loaded(volume.transpose(2, 1, 0)[None], aff, "dicom-multiframe", str(path),
                           _modality_of(header), extra)
    ds = _dcmread(path, header_only=False)
    pixels = _grey(path, ds, _decode(path, ds))
    if frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape != (frames, rows, cols):
        raise RadFM3DInputError(path, f"pixel data has shape {pixels.shape}, header says {(frames, rows, cols)}")
    values = pixels.astype(np.float32)
    for i in range(frames):
        slope, intercept = rescale(i)
        if slope != 1.0 or intercept:
            values[i] = values[i] * np.float32(slope) + np.float32(intercept)
    if not np.array_equal(order, np.arange(frames)):
        values = values[order]
    values = _maybe_invert(ds, values)
    return _Loaded(values.transpose(2, 1, 0)[None], aff, "dicom-multiframe", str(path), _modality_of(ds), extra)


def _read_native_frames(path: Path, header: Any, pixel_offset: int, layout: tuple[np.dtype, int],
                        order: np.ndarray, rows: int, cols: int, rescale: Any) -> np.ndarray | None:
    """(frames, rows, cols) float32 of an uncompressed multi-frame file, frame ``order[j]`` into plane ``j``,
    rescaled per frame; read a frame at a time (the result plus one frame in memory). None: let pydicom decode."""
    frames = len(order)
    volume = np.empty((frames, rows, cols), dtype=np.float32)
    buf = bytearray(rows * cols * 4)
    s = _SliceHeader(path, header, pixel_offset)
    for j, i in enumerate(order):
        pixels = _read_native_pixels(s, *layout, rows, cols, buf, frame=int(i), frames=frames)
        if pixels is None:
            return None
        slope, intercept = rescale(int(i))
        plane = volume[j]
        # the same float32 arithmetic as pixels.astype(float32) * slope + intercept
        if slope != 1.0:
            np.multiply(pixels, np.float32(slope), out=plane, dtype=np.float32)
        else:
            plane[...] = pixels
        if intercept:
            np.add(plane, np.float32(intercept), out=plane)
    return volume


def _decode(path: Path, ds: Any) -> np.ndarray:
    """``ds.pixel_array`` with a clear error for missing decoders and damaged pixel data."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise RadFM3DInputError(path, "DICOM file has no pixel data")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    compressed = ts is not None and ts.is_compressed
    if compressed:
        hint = _DECODER_HINTS.get(str(ts), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg  (or python-gdcm)")
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:
            raise RadFM3DInputError(path, f"pixel data use the transfer syntax {ts.name}, which pydicom cannot "
                                          "decode") from None
        if not available:
            raise RadFM3DInputError(path, f"cannot decode the {ts.name} pixel data: no decoder for it is installed; "
                                          f"install one with `pip install {hint}`") from None
    try:
        return ds.pixel_array
    except MemoryError:
        raise RadFM3DInputError(path, _OUT_OF_MEMORY) from None
    except Exception as err:
        if compressed:
            raise RadFM3DInputError(path, f"could not decode the {ts.name} pixel data ({_short(err)}); another "
                                          f"decoder may help: `pip install {hint}`") from None
        raise RadFM3DInputError(path, f"corrupt or truncated DICOM pixel data ({_short(err)})") from None


def _grey(path: Path, ds: Any, pixels: np.ndarray) -> np.ndarray:
    """Colour DICOM (RGB / YBR, already RGB from pydicom, / PALETTE COLOR) -> luminance; grey unchanged."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as err:
            raise RadFM3DInputError(path, f"could not apply the DICOM colour palette ({_short(err)})") from None
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR":
        return pixels[..., :3].astype(np.float32) @ _LUMA.astype(np.float32)
    return pixels


def _maybe_invert(ds: Any, values: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (not CT): ``min + max - values``, in place for writeable float arrays."""
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" and _modality_of(ds) != "CT":
        total = values.min() + values.max()
        if values.dtype.kind == "f" and values.flags.writeable:
            np.subtract(total, values, out=values)
        else:
            values = total - values
    return values


def _dicom_affine(ipp: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, spacing: tuple[float, float],
                  step: np.ndarray) -> np.ndarray:
    """Voxel (X=column, Y=row, Z=slice) -> RAS mm. ``spacing`` = DICOM PixelSpacing (row spacing, column spacing)."""
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_dir, dtype=np.float64) * spacing[1]
    lps[:3, 1] = np.asarray(col_dir, dtype=np.float64) * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = ipp
    return _LPS_RAS @ lps


def _pixel_spacing(source: Any, ds: Any, value: Any = None) -> tuple[float, float]:
    value = value if value is not None else (ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"))
    if value is None or len(value) < 2:
        return (1.0, 1.0)
    spacing = (float(value[0]), float(value[1]))
    _check_spacing_values(source, spacing, "PixelSpacing")
    return spacing


def _rescale_of(ds: Any) -> tuple[float, float]:
    slope = _as_float(ds.get("RescaleSlope"))
    intercept = _as_float(ds.get("RescaleIntercept"))
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _num_frames(ds: Any) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _modality_of(ds: Any) -> str:
    return str(ds.get("Modality", "") or "unknown").upper()


def _sop_name(ds: Any) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "unknown SOP class")


def _vec(ds: Any, attr: str, n: int) -> np.ndarray | None:
    value = ds.get(attr)
    if value is None or len(value) != n:
        return None
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _first_float(ds: Any, *attrs: str) -> float | None:
    for attr in attrs:
        value = _as_float(ds.get(attr))
        if value:
            return value
    return None


def _as_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ds(value: float) -> str:
    """A DICOM DS string (at most 16 characters)."""
    text = f"{float(value):.10g}"
    return "0" if text in ("-0", "0") else text


def _int16_rescale(values: np.ndarray) -> tuple[float, float]:
    """(slope, intercept), already rounded to DS precision, so that int16 * slope + intercept ~= values."""
    lo, hi = float(values.min()), float(values.max())
    if np.array_equal(values, np.rint(values)) and lo >= -32768 and hi <= 32767:
        return 1.0, 0.0
    slope = float(_ds(max(hi - lo, 1e-6) / 65000.0))
    intercept = float(_ds(lo + 32500.0 * slope))
    return slope, intercept


# ----------------------------------------------------------------------------------------------- PNG / JPEG
def _read_pil(path: Path, fmt: str, limits: _Limits) -> _Loaded:
    pil = _require("PIL.Image", "Pillow")
    try:
        img = pil.open(str(path))
    except pil.DecompressionBombError as err:
        raise RadFM3DInputError(path, f"image too large ({_short(err)})") from None
    except Exception as err:  # UnidentifiedImageError, OSError
        raise RadFM3DInputError(path, f"not a readable {fmt.upper()} image ({_short(err)})") from None
    with img:
        width, height = img.size
        # decoded bands (<= 4 bytes each) + float32 bands + the luminance result
        _check_voxels(path, (width, height, len(img.getbands())), limits, 8)
        try:
            img.load()
        except MemoryError:
            raise RadFM3DInputError(path, _OUT_OF_MEMORY) from None
        except Exception as err:
            raise RadFM3DInputError(path, f"corrupt or truncated {fmt.upper()} image ({_short(err)})") from None
        mode = img.mode
        if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
            pixels = np.asarray(img).astype(np.float32)
        elif mode in ("LA", "La"):
            pixels = np.asarray(img.getchannel(0)).astype(np.float32)
        else:
            rgb = np.asarray(img.convert("RGB")).astype(np.float32)
            pixels = rgb @ _LUMA.astype(np.float32)
    aff = _LPS_RAS.copy()
    return _Loaded(pixels.T[None, :, :, None], aff, fmt, str(path), extra={"geometry_known": False})


# ----------------------------------------------------------------------------------------------- arrays
def _is_array(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _read_array(x: Any, affine: Any, limits: _Limits) -> _Loaded:
    meta = dict(getattr(x, "meta", {}) or {}) if hasattr(x, "meta") else {}
    channel_first = bool(meta) or type(x).__name__ == "MetaTensor"
    if affine is None and channel_first and getattr(x, "affine", None) is not None:
        affine = x.affine
    source = str(meta.get("filename_or_obj") or _ARRAY_SOURCE)
    arr = _to_numpy(x)
    if arr.dtype.kind not in "biuf":
        raise RadFM3DInputError(source, f"unsupported array dtype {arr.dtype}; expected bool, integer or float")
    _check_voxels(source, arr.shape, limits)  # the result (a cast copy; the input is the caller's)
    if channel_first:  # MetaTensor: (C, X, Y) or (C, X, Y, Z)
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise RadFM3DInputError(source, f"a MetaTensor must be channel-first (C, X, Y[, Z]); got shape {arr.shape}")
        data = arr
    elif arr.ndim == 4 and arr.shape[0] == 1:
        data = arr
    elif arr.ndim == 4:
        raise RadFM3DInputError(source, _four_d_message(arr.shape[3], arr.shape) + "; a channel-first (1, X, Y, Z) "
                                        "array is also accepted")
    else:
        spatial, channels = _file_layout(source, arr.shape)
        if channels != 1:
            raise RadFM3DInputError(source, f"{arr.ndim}D array (shape {arr.shape}) is not supported")
        data = arr.reshape(spatial)[None]
    if affine is None:
        aff = np.eye(4)
    else:
        aff = np.array(_to_numpy(affine), dtype=np.float64)
        if aff.shape != (4, 4):
            raise RadFM3DInputError(source, f"affine must be a 4x4 matrix (voxel -> RAS mm), got shape {aff.shape}")
    if data.shape[-1] == 1 and not np.any(aff[:3, 2]):
        aff = _complete_2d_affine(aff)
    _check_affine(source, aff)
    extra = {k: meta[k] for k in ("series_uid",) if k in meta}
    fmt = str(meta.get("source_format", "array"))
    return _Loaded(data, aff, fmt, source, str(meta.get("modality", "unknown")), extra)


# ----------------------------------------------------------------------------------------------- validation
def _check_voxels(source: Any, shape: Sequence[int], limits: _Limits, work_per_voxel: int = 0,
                  extra_bytes: int = 0) -> None:
    """Refuse a header whose element count or memory need is over the limits, before anything is allocated.

    Memory need = elements x (``work_per_voxel`` bytes of stored pixels / working copies + the output dtype's
    itemsize) + ``extra_bytes`` (e.g. a compressed file read whole).
    """
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape, dtype=np.float64))
    if count > limits.max_voxels:
        raise RadFM3DInputError(source, f"the header claims {count:,} voxels (shape {shape}), "
                                        f"more than max_voxels={limits.max_voxels:,}; nothing was read. Pass a larger "
                                        "max_voxels if the image is genuine")
    if count == 0:
        raise RadFM3DInputError(source, f"the image has no voxels (shape {shape})")
    need = count * (int(work_per_voxel) + limits.out_dtype.itemsize) + int(extra_bytes)
    if limits.max_bytes is not None and need > limits.max_bytes:
        raise RadFM3DInputError(source, f"reading this image (shape {shape}, {limits.out_dtype} result) needs "
                                        f"{_gb(need)} GB ({need:,} bytes), the limit is {_gb(limits.max_bytes)} GB "
                                        f"(max_bytes={limits.max_bytes:,}); nothing was read. The file itself may be "
                                        "fine: pass a larger max_bytes if this machine has the memory")


_OUT_OF_MEMORY = ("ran out of memory while reading; the file is not necessarily damaged. Free memory, or lower "
                  "max_bytes so that such files are refused up front")


def _gb(n: int) -> str:
    """Bytes as decimal GB with 3 significant digits ("2.41", "0.000512")."""
    return f"{n / 1e9:.3g}"


def _no_memory_message(shape: Sequence[int], per_voxel: int, limits: _Limits) -> str:
    need = int(np.prod([int(s) for s in shape], dtype=np.float64)) * int(per_voxel)
    return (f"ran out of memory while reading (about {_gb(need)} GB needed for shape {tuple(int(s) for s in shape)}); "
            f"the file is not necessarily damaged. Free memory, or lower max_bytes "
            f"(now {'unlimited' if limits.max_bytes is None else f'{_gb(limits.max_bytes)} GB'}) so such files are "
            "refused up front")


def _check_spacing_values(source: Any, spacing: Sequence[float], what: str) -> None:
    values = [float(s) for s in spacing]
    if any(not np.isfinite(s) or s <= 0 for s in values):
        raise RadFM3DInputError(source, f"zero or negative {what} {tuple(values)} mm; the header is broken")


def _check_affine(source: Any, aff: np.ndarray) -> None:
    """Finite 4x4, every voxel spacing within [MIN_SPACING_MM, MAX_SPACING_MM], axes not parallel."""
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise RadFM3DInputError(source, "the voxel-to-world affine contains NaN/Inf; the header is broken")
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    if np.any(spacing == 0):
        raise RadFM3DInputError(source, f"zero voxel spacing along axis {int(np.argmin(spacing))} "
                                        f"(spacing {tuple(round(float(s), 6) for s in spacing)} mm); the header "
                                        "is broken")
    if np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise RadFM3DInputError(source, f"absurd voxel spacing {tuple(float(f'{s:.6g}') for s in spacing)} mm (allowed "
                                        f"{MIN_SPACING_MM}-{MAX_SPACING_MM} mm); are the header's units wrong "
                                        "(metres/micrometres)?")
    if abs(np.linalg.det(aff[:3, :3] / spacing)) < 1e-6:
        raise RadFM3DInputError(source, "singular affine: two voxel axes point the same way (determinant ~ 0), so "
                                        "voxels cannot be placed in space; the header's orientation is broken")


def _complete_2d_affine(aff: np.ndarray) -> np.ndarray:
    """Give a 2D image's third (slice) axis 1 mm along the in-plane normal if the header left it empty."""
    out = np.array(aff, dtype=np.float64)
    if not np.any(out[:3, 2]):
        normal = np.cross(out[:3, 0], out[:3, 1])
        norm = np.linalg.norm(normal)
        out[:3, 2] = normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
    return out


def _finish(loaded: _Loaded, dtype: Any):
    """Validate voxel values, convert dtype and wrap into a MetaTensor with the contract's meta keys."""
    import torch
    from monai.data import MetaTensor

    data, source = loaded.data, loaded.filename
    out_dtype = np.dtype(dtype).newbyteorder("=")
    if data.size and data.dtype.kind in "biuf":
        # NaN propagates through min/max; avoids a full-size boolean mask
        lo, hi = loaded.value_range if loaded.value_range is not None else (data.min(), data.max())
        if data.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(data)))
            raise RadFM3DInputError(source, f"{bad:,} of {data.size:,} voxels are NaN or Inf; clean the data first, "
                                            "e.g. np.nan_to_num(arr, nan=background)")
        _check_fits(source, float(lo), float(hi), data.dtype, out_dtype)
    # the range check above guarantees that this cast neither wraps nor overflows to Inf
    out = data.astype(out_dtype, copy=False)
    if not out.flags.writeable:
        out = out.copy()
    loaded.keepalive = None
    spatial = tuple(int(s) for s in out.shape[1:])
    spacing = tuple(float(s) for s in np.linalg.norm(loaded.affine[:3, :3], axis=0))
    meta: dict[str, Any] = {
        "filename_or_obj": source,
        "source_format": loaded.source_format,
        "original_shape": spatial,
        "original_spacing": spacing,
        "original_affine": loaded.affine.copy(),
        "modality": loaded.modality or "unknown",
        "is_2d": spatial[2] == 1,
        "space": "RAS",
        "original_channel_dim": 0,
        "spatial_shape": np.asarray(spatial),
    }
    meta.update(loaded.extra)
    return MetaTensor(torch.from_numpy(out), affine=torch.as_tensor(loaded.affine, dtype=torch.float64), meta=meta)


def _check_fits(source: Any, lo: float, hi: float, src: np.dtype, out_dtype: np.dtype) -> None:
    """Refuse a cast to ``out_dtype`` that cannot hold values in [lo, hi] (integer wrap-around, float overflow)."""
    if out_dtype == src:
        return
    if out_dtype.kind in "iu":
        info = np.iinfo(out_dtype)
        if lo < info.min or hi > info.max:
            raise RadFM3DInputError(source, f"values {lo:g} .. {hi:g} do not fit dtype={out_dtype} (range "
                                            f"{info.min} .. {info.max}); they would wrap around. Use a wider dtype, "
                                            "e.g. np.float32 or np.int16")
    elif out_dtype.kind == "f":
        top = float(np.finfo(out_dtype).max)
        if max(abs(lo), abs(hi)) > top:
            raise RadFM3DInputError(source, f"values {lo:g} .. {hi:g} do not fit dtype={out_dtype} (largest "
                                            f"{top:g}); they would become Inf. Use np.float32")
    elif out_dtype.kind == "b" and (lo < 0 or hi > 1):
        raise RadFM3DInputError(source, f"values {lo:g} .. {hi:g} are not a mask; dtype=bool holds only 0 and 1")


# ----------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):
        x = x.detach()
        if hasattr(x, "as_tensor"):
            x = x.as_tensor()
        return x.cpu().numpy()
    return np.asarray(x)


def _image_data_affine(image: Any) -> tuple[np.ndarray, np.ndarray]:
    data = _to_numpy(image)
    aff = getattr(image, "affine", None)
    aff = np.eye(4) if aff is None else np.asarray(_to_numpy(aff), dtype=np.float64)
    if data.ndim not in (3, 4):
        raise RadFM3DInputError(_ARRAY_SOURCE, f"expected a (C, X, Y, Z) or (X, Y, Z) image, got shape {data.shape}")
    return data, aff


def _nifti_safe_dtype(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        return data.astype(np.int32) if data.min() >= info.min and data.max() <= info.max else data.astype(np.float64)
    if data.dtype == np.float16:
        return data.astype(np.float32)
    return data


def _short(err: BaseException, limit: int = 240) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - all are install_requires
        raise ImportError(f"radfm3d.io needs {package}: pip install {package}") from err
