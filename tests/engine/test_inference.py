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
