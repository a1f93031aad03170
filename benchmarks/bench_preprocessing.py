# Copyright (c) radfm3d contributors. Apache-2.0.
"""Benchmark: preprocessing a 512x512x300 int16 CT (.nii.gz) to the demo grid, against reading it with SimpleITK;
and reading the same CT as a DICOM series, against SimpleITK's ImageSeriesReader (GDCM).

Run:  .venv/bin/python -m benchmarks.bench_preprocessing [--slices 300] [--repeats 3] [--dicom-only]

Every timing is the best of ``--repeats`` rounds in this one process, on the same file; the cases run
round-robin inside each round, so a busy shared machine slows all of them alike:
- ``sitk_read``         SimpleITK ReadImage (the reference, ratio 1.0);
- ``radfm3d``           radfm3d.io.load_image + radfm3d.transforms.preprocess to (3, 128, 128, 32), 3 HU windows,
                        geometry-correct (orientation, spacing/FOV, one antialiased interpolation);
- ``load_image``        radfm3d.io.load_image alone; ``preprocess`` alone (already loaded, float32);
- ``preprocess_scipy``  the same with scipy.ndimage.map_coordinates as the sampler; ``preprocess_noaa`` and
                        ``preprocess_noaa_scipy`` without the antialiasing pre-filter (sampling the full
                        512x512x300 volume at the 0.5 M grid points: the torch-vs-scipy question);
- ``sitk_preprocess``   SimpleITK read -> MetaTensor (RAS affine, zero-copy view) + preprocess: what a
                        SimpleITK-backed .nii.gz path in radfm3d.io would cost (benchmark-only code);
- ``monai_naive``       Compose(LoadImaged, EnsureChannelFirstd, Orientationd(RAS), Spacingd(grid spacing), Resized);
- ``blind_nearest``     nibabel read + scipy.ndimage.zoom(order=0) to the grid (geometry-blind, RadFM's way);
- ``nibabel_read``      nibabel read of the voxels (what a nibabel-based reader pays for gzip).
Writes ``benchmarks/results/preprocessing.json``.

DICOM series (``benchmarks/results/preprocessing_dicom.json``): the CT written as one file per slice (uncompressed,
Explicit VR Little Endian, shuffled file names, LPS, stored uint16 with RescaleSlope/RescaleIntercept), in two
variants: slope 1 / intercept -1024 (SimpleITK then returns int16) and slope 0.5 / intercept -1024 (SimpleITK
returns float64); radfm3d always returns float32 HU. Cases, round-robin, best of ``--repeats``:
- ``sitk_series``  ImageSeriesReader.GetGDCMSeriesFileNames (parse + sort) + Execute (the reference, ratio 1.0);
- ``load_image``   radfm3d.io.load_image(folder) (walk, parse, sort, read, rescale).
Peak memory of load_image (tracemalloc: every numpy/Python allocation, in a separate untimed call) is reported as a
ratio to the output array; the voxels are checked equal to SimpleITK's. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "preprocessing.json"
DICOM_RESULTS = Path(__file__).resolve().parent / "results" / "preprocessing_dicom.json"


def make_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Synthetic int16 CT (HU): air outside an elliptic body, soft tissue with noise, lungs, a spine."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    lungs = ((np.abs(x) - 0.4) / 0.28) ** 2 + (y / 0.4) ** 2 < 1
    spine = x ** 2 + (y - 0.45) ** 2 < 0.01
    plane = np.where(body, 40, -1024).astype(np.int16)
    plane[lungs & body] = -850
    plane[spine] = 700
    vol = np.empty(shape, dtype=np.int16)
    for z in range(shape[2]):
        noise = rng.normal(0, 15, size=shape[:2]).astype(np.int16)
        vol[:, :, z] = plane + np.where(body, noise, 0)
    return vol


def write_ct_series(folder: Path, vol: np.ndarray, slope: float, intercept: float, seed: int = 1) -> None:
    """One uncompressed CT file per Z slice of ``vol`` (HU), stored uint16 = (HU - intercept) / slope; LPS axial
    geometry (0.7 mm pixels, 1 mm slices); file names shuffled so that name order is not slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    nz = vol.shape[2]
    names = np.random.default_rng(seed).permutation(nz)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "BENCH", "BENCH"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-179.0, -179.0, -150.0 + k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        stored = np.rint((vol[:, :, k].astype(np.float64) - intercept) / slope).clip(0, 65535).astype("<u2")
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()  # (Rows=Y, Columns=X)
        ds.save_as(folder / f"IM{names[k]:05d}", enforce_file_format=True)


def bench_dicom_series(slices: int, repeats: int, output: Path, argv: list[str]) -> dict[str, Any]:
    """load_image on a DICOM series vs SimpleITK's ImageSeriesReader, side by side in this process."""
    import tracemalloc

    import SimpleITK as sitk

    from radfm3d.io import load_image

    shape = (512, 512, slices)
    vol = make_ct(shape)
    report: dict[str, Any] = {"command": " ".join(["python -m benchmarks.bench_preprocessing", *argv]),
                              "input": {"shape": list(shape), "files": slices, "format": "DICOM series",
                                        "transfer_syntax": "Explicit VR Little Endian", "stored": "uint16",
                                        "axcodes": "LPS", "names": "shuffled"},
                              "repeats": repeats, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for slope, intercept in ((1.0, -1024.0), (0.5, -1024.0)):
            folder = Path(tmp) / f"ct_slope{slope:g}"
            t0 = time.perf_counter()
            write_ct_series(folder, vol, slope, intercept)
            print(f"wrote {slices} DICOM files, slope {slope:g} intercept {intercept:g} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)

            def sitk_series() -> Any:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
                return reader.Execute()

            cases = {"sitk_series": sitk_series, "load_image": lambda: load_image(folder)}
            for fn in cases.values():  # warm-up: imports, decoder look-ups, page cache
                fn()
            results = best_of_rounds(cases, repeats)
            reference = sitk_series()
            ours = load_image(folder)
            same = bool(np.array_equal(sitk.GetArrayViewFromImage(reference).T, ours[0].numpy()))
            spacing_ok = np.allclose(np.linalg.norm(ours.affine.numpy()[:3, :3], axis=0), reference.GetSpacing())
            assert same and spacing_ok, "load_image and SimpleITK disagree on the voxels or the spacing"
            out_bytes = ours.numel() * ours.element_size()
            del ours
            tracemalloc.start()
            ours = load_image(folder)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            del ours
            ratio = results["load_image"] / results["sitk_series"]
            print(f"slope {slope:g}: load_image {results['load_image']:.3f} s, SimpleITK "
                  f"{results['sitk_series']:.3f} s ({reference.GetPixelIDTypeAsString()}) -> {ratio:.2f}x "
                  f"(target <= 1.2x); peak memory {peak / 2**20:.0f} MiB = {peak / out_bytes:.2f}x the "
                  f"{out_bytes / 2**20:.0f} MiB float32 output (target <= 1.3x)", flush=True)
            report["variants"][f"slope{slope:g}_intercept{intercept:g}"] = {
                "seconds": results, "ratio_vs_sitk_series": ratio,
                "sitk_output_type": reference.GetPixelIDTypeAsString(), "voxels_equal_to_sitk": same,
                "peak_bytes_tracemalloc": peak, "output_bytes": out_bytes, "peak_ratio_vs_output": peak / out_bytes}
            del reference
    report["machine"] = {"cpu_threads": torch.get_num_threads(), "sitk_threads":
                         sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), "python": platform.python_version(),
                         "load_average_1min_at_end": os.getloadavg()[0]}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


def best_of_rounds(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time per case over ``repeats`` round-robin rounds."""
    best = {name: float("inf") for name in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{k} {v:.2f}" for k, v in best.items()), flush=True)
    return best


def sitk_metatensor(path: Path, modality: str = "CT") -> Any:
    """(1, X, Y, Z) float32 MetaTensor with a voxel->RAS affine from SimpleITK (LPS) - benchmark only."""
    import SimpleITK as sitk
    from monai.data import MetaTensor

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayViewFromImage(img).T  # (X, Y, Z) view of the (Z, Y, X) buffer: Fortran order
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    data = torch.from_numpy(arr.astype(np.float32, order="K"))[None]
    return MetaTensor(data, affine=torch.as_tensor(ras), meta={"modality": modality})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive MONAI chain")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--dicom-only", action="store_true", help="only the DICOM series case")
    parser.add_argument("--skip-dicom", action="store_true", help="skip the DICOM series case")
    parser.add_argument("--dicom-output", type=Path, default=DICOM_RESULTS)
    args = parser.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if not args.skip_dicom:
        bench_dicom_series(args.slices, args.repeats, args.dicom_output, argv_list)
    if args.dicom_only:
        return 0

    import nibabel as nib
    import SimpleITK as sitk
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Resized, Spacingd
    from scipy import ndimage

    from radfm3d.io import load_image
    from radfm3d.transforms import PreprocessingRecipe, compute_grid_geometry, preprocess

    shape = (512, 512, args.slices)
    recipe = PreprocessingRecipe(spatial_size=(128, 128, 32))  # the demo grid, 3 HU windows
    no_aa = PreprocessingRecipe(spatial_size=(128, 128, 32), antialias=False)
    # a typical converter's affine: rows run L and P (LPS storage), 0.7 mm in-plane, 1 mm slices
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    affine[:3, 3] = [179.0, 179.0, -150.0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        t0 = time.perf_counter()
        nib.save(nib.Nifti1Image(make_ct(shape), affine), str(path))
        print(f"wrote {path.name}: {shape} int16, {path.stat().st_size / 2**20:.1f} MiB "
              f"({time.perf_counter() - t0:.1f} s)")

        grid_spacing = compute_grid_geometry(affine, shape, recipe).grid_spacing
        naive = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                         Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                         Spacingd("image", pixdim=grid_spacing, mode="bilinear"),
                         Resized("image", spatial_size=recipe.spatial_size, mode="trilinear")])

        def blind() -> np.ndarray:
            arr = np.asanyarray(nib.load(str(path)).dataobj)
            return ndimage.zoom(arr, [g / s for g, s in zip(recipe.spatial_size, arr.shape)], order=0)

        loaded = load_image(path, modality="CT")  # a NIfTI does not say CT: hint it, as a manifest would
        cases: dict[str, Callable[[], Any]] = {
            "sitk_read": lambda: sitk.ReadImage(str(path)),
            "radfm3d": lambda: preprocess(load_image(path, modality="CT"), recipe),
            "load_image": lambda: load_image(path, modality="CT"),
            "preprocess": lambda: preprocess(loaded, recipe),
            "preprocess_scipy": lambda: preprocess(loaded, recipe, sampler="scipy"),
            "preprocess_noaa": lambda: preprocess(loaded, no_aa),
            "preprocess_noaa_scipy": lambda: preprocess(loaded, no_aa, sampler="scipy"),
            "sitk_preprocess": lambda: preprocess(sitk_metatensor(path), recipe),
            "blind_nearest": blind,
            "nibabel_read": lambda: np.asanyarray(nib.load(str(path)).dataobj),
        }
        if not args.skip_naive:
            cases["monai_naive"] = lambda: naive({"image": str(path)})
        results = best_of_rounds(cases, args.repeats)
        out = preprocess(loaded, recipe)
        assert tuple(out.shape) == (3, 128, 128, 32) and json.loads(out.meta["intensity"])["mode"] == "ct_windows"
        # the SimpleITK-backed variant must give the same tensor (same geometry, same values)
        diff = float((preprocess(sitk_metatensor(path), recipe) - out).abs().max())
        print(f"max |radfm3d - sitk_preprocess| = {diff:.2e}")
        assert diff < 1e-4

    ref = results["sitk_read"]
    print(f"\n{'step':<24}{'seconds':>10}{'x sitk read':>14}")
    for name, sec in results.items():
        print(f"{name:<24}{sec:>10.3f}{sec / ref:>14.2f}")
    verdict = results["radfm3d"] / ref
    print(f"\nradfm3d load+preprocess = {verdict:.2f}x the SimpleITK read (target <= 2x)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(["python -m benchmarks.bench_preprocessing", *(sys.argv[1:] if argv is None else argv)]),
        "input": {"shape": list(shape), "dtype": "int16", "format": ".nii.gz", "axcodes": "LPS"},
        "grid": list(recipe.spatial_size), "ct_windows": recipe.ct_windows, "repeats": args.repeats,
        "seconds": results, "ratio_vs_sitk_read": {k: v / ref for k, v in results.items()},
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_1min_at_end": os.getloadavg()[0]},
    }, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
