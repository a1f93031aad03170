# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import radgenome-chestct`` on a tiny copy of its layout: region sentences, region masks, volumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radfm3d.data.importers.radgenome import import_radgenome
from radfm3d.data.manifest import read_manifest
from radfm3d.text.boxes import parse_boxes
from radfm3d.transforms import PreprocessingRecipe

_AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1.0]])


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, _AFFINE), str(path))


@pytest.fixture()
def radgenome(tmp_path) -> Path:
    ds = tmp_path / "RadGenome-ChestCT" / "dataset"
    for name in ("train_1_a_1", "train_2_a_1"):
        _nifti(ds / "train_preprocessed" / name.rsplit("_", 2)[0] / f"{name[:-2]}" / f"{name}.nii.gz",
               np.full((20, 20, 10), -1000, dtype=np.int16))
    heart = np.zeros((20, 20, 10), dtype=np.uint8)
    heart[5:9, 6:12, 2:4] = 1  # voxels x 5..8, y 6..11, z 2..3
    _nifti(ds / "train_region_mask/seg_train_1_a_1/heart.nii.gz", heart)
    _nifti(ds / "train_region_mask/seg_train_1_a_1/lung.nii.gz", np.zeros((20, 20, 10), dtype=np.uint8))
    (ds / "radgenome_files").mkdir(parents=True)
    with open(ds / "radgenome_files/train_region_report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Volumename", "Anatomy", "Sentence"])
        w.writerow(["train_1_a_1.nii.gz", "", "Cardiomegaly. Lungs clear."])
        w.writerow(["train_1_a_1.nii.gz", "heart", "Cardiomegaly."])
        w.writerow(["train_1_a_1.nii.gz", "lung", "Lungs clear."])
        w.writerow(["train_9_a_1.nii.gz", "heart", "Normal heart."])
        w.writerow(["train_2_a_1.nii.gz", "thyroid", "Thyroid normal."])
    return ds.parent


def test_radgenome_region_records_boxes_and_grounding(radgenome, tmp_path):
    out = tmp_path / "out"
    recipe = PreprocessingRecipe(spatial_size=(32, 32, 16))
    report = import_radgenome(radgenome, out, splits=("train",), recipe=recipe, progress=False)
    records = {r["id"]: r for r in read_manifest(out / "train.jsonl")}
    assert records["train_1_a_1.nii.gz-report"]["answer"] == "Cardiomegaly. Lungs clear."
    heart = records["train_1_a_1.nii.gz-heart-report"]
    assert heart["answer"] == "Cardiomegaly." and heart["ground_truth"]["structure"] == "heart"
    # voxels 5..8 x 6..11 x 2..3 with 0.8/0.8/2 mm spacing from (-10, 20, -30), whole voxels
    expected = [-10 + 4.5 * 0.8, 20 + 5.5 * 0.8, -30 + 1.5 * 2, -10 + 8.5 * 0.8, 20 + 11.5 * 0.8, -30 + 3.5 * 2]
    np.testing.assert_allclose(heart["ground_truth"]["box_world_mm"], expected, atol=1e-3)
    (box,) = parse_boxes(records["train_1_a_1.nii.gz-heart-grounding"]["answer"])
    assert all(0 <= v <= 99 for v in box) and box[0] < box[3]
    problems = " | ".join(s["problem"] for s in report.skipped)
    assert "mask lung is empty" in problems and "volume train_9_a_1.nii.gz not found" in problems
    assert "no mask train_region_mask/seg_train_2_a_1/thyroid.nii.gz" in problems
    data = json.loads((out / "import_report.json").read_text())
    assert data["region_sentences_with_masks"] == {"heart": 1}
    # a rerun reuses every volume's stored result
    again = import_radgenome(radgenome, out, splits=("train",), recipe=recipe, progress=False)
    assert again.to_dict()["records"] == data["records"]
