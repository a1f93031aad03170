# Copyright (c) radfm3d contributors. Apache-2.0.
"""radfm3d.inference helpers: prompts, scan discovery, boxes on the scan, the PNG (the bundle run is in tests/bundles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radfm3d.inference import TASK_PROMPTS, boxes_in_text, draw_boxes_png, find_scans, prompt_list


def test_prompt_list():
    assert prompt_list() == [TASK_PROMPTS["report"], TASK_PROMPTS["modality"], TASK_PROMPTS["region"]]
    assert prompt_list("modality") == [TASK_PROMPTS["modality"]]
    assert prompt_list(prompts=["Locate the spleen.", "<image> Where?"]) == ["<image> Locate the spleen.",
                                                                             "<image> Where?"]
    assert prompt_list("Is there a mass?", ["ignored"]) == ["<image> Is there a mass?"]  # --prompt wins
    with pytest.raises(ValueError):
        prompt_list(["  "])


def test_find_scans(tmp_path: Path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "b.nrrd").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a scan")
    series = tmp_path / "series"
    series.mkdir()
    (series / "0001.dcm").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    found = [Path(p).name for p in find_scans(tmp_path)]
    assert found == ["a.nii.gz", "b.nrrd", "series"]
    assert find_scans(scans=[str(series)]) == [str(series)]
    assert find_scans(series) == [str(series)]  # a DICOM folder given as the dataset
    with pytest.raises(ValueError, match="no scans"):
        find_scans(tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        find_scans(scans=[str(tmp_path / "missing.nii")])


def test_boxes_in_text_and_png(tmp_path: Path):
    from radfm3d.transforms import GridGeometry

    # grid 10x10x5 over an original 20x20x10 volume with 2 mm voxels at origin (100, 0, -50)
    original = np.diag([2.0, 2.0, 2.0, 1.0])
    original[:3, 3] = (100.0, 0.0, -50.0)
    grid = original @ np.diag([2.0, 2.0, 2.0, 1.0])
    grid[:3, 3] = original[:3, 3] + 1.0  # grid voxel 0 centre sits between original voxels 0 and 1
    geom = GridGeometry(grid, original, (20, 20, 10), (10, 10, 5)).to_dict()
    boxes = boxes_in_text("Mass here: <box>0,0,0,99,99,99</box>.", geom)
    assert len(boxes) == 1 and boxes[0]["box_0_99"] == [0, 0, 0, 99, 99, 99]
    voxel, world = np.array(boxes[0]["box_voxel"]), np.array(boxes[0]["box_world_mm"])
    assert np.all(voxel[:3] >= -1) and np.all(voxel[3:] <= 20.5)  # inside the original volume
    assert np.allclose(world[:3], original[:3, :3] @ voxel[:3] + original[:3, 3], atol=1e-6)
    assert boxes_in_text("no box", geom) == []
    assert boxes_in_text("<box>1,2,3,4,5,6</box>", None) == [{"box_0_99": [1, 2, 3, 4, 5, 6]}]
    volume = np.random.default_rng(0).normal(size=(1, 20, 20, 10)).astype(np.float32)
    png = draw_boxes_png(volume, [boxes[0]["box_voxel"], [2, 2, 2, 5, 5, 5]], tmp_path / "x.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_names_are_unique_within_a_run():
    from radfm3d.inference import output_names

    assert output_names(["d/a.nii.gz", "d/b.nrrd", "d/series"]) == ["a", "b", "series"]
    assert output_names(["d/ct.nii.gz", "d/ct.nrrd", "d/mr.mha"]) == ["ct.nii.gz", "ct.nrrd", "mr"]
    assert output_names(["x/scan.nii", "y/scan.nii"]) == ["x_scan.nii", "y_scan.nii"]
    assert output_names(["d/CT.nii", "d/ct.NRRD"]) == ["CT.nii", "ct.NRRD"]  # case-insensitive file systems
    assert output_names(["d/a.nii", "d/a.nii"]) == ["d_a.nii_1", "d_a.nii_2"]


def _scan_folder(folder: Path) -> Path:
    """A corrupt .nii.gz first, then ct.nii.gz and ct.nrrd (one volume, two formats, one stem)."""
    import nibabel as nib
    import nrrd

    folder.mkdir(parents=True)
    (folder / "a_corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a gzip stream")
    vol = np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 4.0, 1.0])), str(folder / "ct.nii.gz"))
    nrrd.write(str(folder / "ct.nrrd"), vol, {"space": "left-posterior-superior",
                                               "space directions": np.diag([2.0, 2.0, 4.0]).tolist(),
                                               "space origin": [0.0, 0.0, 0.0]})
    return folder


def test_a_bad_scan_costs_only_itself(tiny_model_dir: Path, tmp_path: Path, capsys):
    """Corrupt first, good second and third: every good scan is written (two results for ct.nii.gz + ct.nrrd),
    the failure is recorded and printed, and the run raises only at the end."""
    import json

    from radfm3d.errors import RadFM3DInputError
    from radfm3d.inference import run_inference

    scans, out = _scan_folder(tmp_path / "scans"), tmp_path / "out"
    with pytest.raises(RadFM3DInputError, match="1 of 3 scan"):
        run_inference(tiny_model_dir, out, dataset_dir=scans, prompts=["modality"], max_new_tokens=2)
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz.json", "ct.nrrd.json", "failures.json"]
    results = {p.name: json.loads(p.read_text()) for p in out.glob("ct.*.json")}
    assert {Path(r["scan"]).name for r in results.values()} == {"ct.nii.gz", "ct.nrrd"}
    assert all(len(r["answers"]) == 1 for r in results.values())
    failures = json.loads((out / "failures.json").read_text())
    assert [Path(f["scan"]).name for f in failures] == ["a_corrupt.nii.gz"]
    assert "NIfTI" in failures[0]["problem"] or "corrupt" in failures[0]["problem"]
    printed = capsys.readouterr().out
    assert "3 scan(s), 2 result(s) written" in printed and "a_corrupt.nii.gz" in printed

    # a clean rerun on the good scans only: no failure, no stale failures.json
    run_inference(tiny_model_dir, out, scans=[str(scans / "ct.nrrd")], prompts=["modality"], max_new_tokens=2)
    assert not (out / "failures.json").exists() and (out / "ct.json").is_file()


@pytest.mark.slow
def test_bundle_run_exits_non_zero_after_writing_the_good_scans(tiny_model_dir: Path, tmp_path: Path):
    """`python -m monai.bundle run` with the bundle's inference.json on the same folder."""
    import json
    import os
    import subprocess
    import sys

    bundle = Path(__file__).resolve().parents[2] / "bundles" / "radfm3d_demo"
    scans, out = _scan_folder(tmp_path / "scans"), tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--model_dir", str(tiny_model_dir), "--dataset_dir", str(scans),
           "--output_dir", str(out), "--max_new_tokens", "2", "--prompt", "modality"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz.json", "ct.nrrd.json", "failures.json"]
    assert "1 of 3 scan(s) failed" in proc.stdout + proc.stderr
    assert json.loads((out / "ct.nrrd.json").read_text())["answers"][0]["prompt"].startswith("<image>")


def test_unusable_output_dir_is_refused_before_any_scan_is_read(tiny_model_dir: Path, tmp_path: Path):
    from radfm3d.inference import run_inference

    taken = tmp_path / "outputs"
    taken.write_text("a file, not a folder")
    with pytest.raises(ValueError, match="outputs: output_dir is an existing file"):
        run_inference(tiny_model_dir, taken, dataset_dir=_scan_folder(tmp_path / "scans"), prompts=["modality"],
                      max_new_tokens=2)
    assert taken.read_text() == "a file, not a folder"
