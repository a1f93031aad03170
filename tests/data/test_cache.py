# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from radfm3d.data.cache import PreprocessedImageCache
from radfm3d.transforms import PreprocessingRecipe, preprocess


def _scan(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    volume = rng.uniform(-1000, 1000, size=(24, 20, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.9, 2.5, 1.0])), str(path))
    return path


def test_cached_equals_preprocessed_and_is_reused(tmp_path: Path):
    recipe = PreprocessingRecipe(spatial_size=(16, 16, 8))
    scan = _scan(tmp_path / "a.nii.gz")
    cache = PreprocessedImageCache(tmp_path / "cache", recipe)
    first = cache(scan)
    direct = preprocess(str(scan), recipe)
    assert first.shape == direct.shape and first.dtype == torch.float32
    assert torch.allclose(first.as_tensor(), direct.as_tensor(), atol=3e-4)  # float16 storage
    assert first.meta["grid_geometry"] == direct.meta["grid_geometry"]
    entry = cache.entry_path(scan)
    stamp = entry.stat().st_mtime_ns
    again = cache(scan)
    assert entry.stat().st_mtime_ns == stamp and torch.equal(again.as_tensor(), first.as_tensor())
    assert not list(entry.parent.glob(".*.tmp"))  # nothing half-written left behind


def test_recipe_or_file_change_gives_a_new_entry(tmp_path: Path):
    scan = _scan(tmp_path / "a.nii.gz")
    small = PreprocessedImageCache(tmp_path / "c", PreprocessingRecipe(spatial_size=(16, 16, 8)))
    large = PreprocessedImageCache(tmp_path / "c", PreprocessingRecipe(spatial_size=(24, 24, 8)))
    assert small.entry_path(scan) != large.entry_path(scan)
    before = small.entry_path(scan)
    time.sleep(0.01)
    _scan(scan, seed=1)
    os.utime(scan, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert small.entry_path(scan) != before


def test_warm_fills_in_parallel_and_skips_done(tmp_path: Path):
    scans = [_scan(tmp_path / f"s{i}.nii.gz", seed=i) for i in range(3)]
    cache = PreprocessedImageCache(tmp_path / "cache", PreprocessingRecipe(spatial_size=(16, 16, 8)))
    assert cache.warm(scans[:1], progress=False) == 1
    assert cache.warm(scans, num_workers=2, progress=False) == 2
    assert cache.warm(scans, progress=False) == 0 and all(cache.has(s) for s in scans)


def test_warm_after_torch_ran_multithreaded_does_not_hang(tmp_path: Path):
    """A forked worker of a process whose OpenMP pool is running hung for ever in its first parallel op (the
    bundle's val-split warm-up after the model was built); workers now run torch single-threaded."""
    scans = [_scan(tmp_path / f"s{i}.nii.gz", seed=i) for i in range(4)]
    script = textwrap.dedent(f"""
        import torch, torch.nn.functional as F
        from radfm3d.data.cache import PreprocessedImageCache
        from radfm3d.transforms import PreprocessingRecipe
        torch.set_num_threads(2)
        for _ in range(3):  # start the intra-op pool, as building/running a model does
            F.interpolate(torch.rand(1, 3, 64, 64, 32), size=(128, 128, 32), mode="trilinear")
            torch.rand(512, 512) @ torch.rand(512, 512)
        cache = PreprocessedImageCache({str(tmp_path / "cache")!r}, PreprocessingRecipe(spatial_size=(32, 32, 16)))
        print("warmed", cache.warm({[str(s) for s in scans]!r}, num_workers=2, progress=False))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warmed 4" in done.stdout


def test_dicom_folder_key_covers_every_file(tmp_path: Path):
    """Replacing a slice that is not the newest file (same size, older time), adding or removing one changes the key."""
    from monai.data import MetaTensor

    from radfm3d.io import save_dicom_series

    arr = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    paths = save_dicom_series(MetaTensor(torch.from_numpy(arr)[None], affine=torch.eye(4, dtype=torch.float64)),
                              tmp_path / "series")
    base = time.time() - 1000
    for i, p in enumerate(paths):
        os.utime(p, ns=(int((base + i) * 1e9),) * 2)  # slice_0003 is the newest
    cache = PreprocessedImageCache(tmp_path / "cache", PreprocessingRecipe(spatial_size=(8, 8, 4)))
    first = cache.entry_path(tmp_path / "series")
    assert cache.entry_path(tmp_path / "series") == first  # stable
    oldest = paths[0]
    blob = bytearray(oldest.read_bytes())
    blob[-1] ^= 0xFF  # one voxel changed, same size
    oldest.write_bytes(bytes(blob))
    os.utime(oldest, ns=(int((base - 5) * 1e9),) * 2)  # still older than every other slice
    changed = cache.entry_path(tmp_path / "series")
    assert changed != first
    (tmp_path / "series" / "extra.dcm").write_bytes(paths[1].read_bytes())
    assert cache.entry_path(tmp_path / "series") not in (first, changed)


def test_detached_header_key_covers_its_data_file(tmp_path: Path):
    raw = tmp_path / "v.raw"
    raw.write_bytes(np.zeros(4 * 3 * 2, "<i2").tobytes())
    header = tmp_path / "v.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementSpacing = 1 1 1\n"
                      "ElementType = MET_SHORT\nElementDataFile = v.raw\n")
    cache = PreprocessedImageCache(tmp_path / "cache", PreprocessingRecipe(spatial_size=(4, 4, 2)))
    first = cache.entry_path(header)
    raw.write_bytes(np.ones(4 * 3 * 2, "<i2").tobytes())
    os.utime(raw, ns=(1_000_000_000, 1_000_000_000))
    assert cache.entry_path(header) != first  # the header file itself did not change
