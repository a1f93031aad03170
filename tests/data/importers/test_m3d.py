# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import m3d-cap`` / ``m3d-vqa`` on tiny copies of M3D-Data's layout (a JSON of image/text pairs, VQA
CSVs, ``(1, 32, 256, 256)``-shaped arrays: here ``(1, 4, 6, 5)``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from radfm3d.cli import main as radfm3d_main
from radfm3d.data.image_meta import load_record_image
from radfm3d.data.importers.m3d import import_m3d_cap, import_m3d_vqa
from radfm3d.data.manifest import read_manifest, resolve_images


@pytest.fixture()
def m3d(tmp_path) -> Path:
    root = tmp_path / "M3D"
    for case in ("000006", "000007"):
        (root / "ct_case" / case).mkdir(parents=True)
        array = np.linspace(0, 1, 4 * 6 * 5, dtype=np.float32).reshape(1, 4, 6, 5)  # (C, D, H, W)
        np.save(root / "ct_case" / case / "Axial_portal_venous.npy", array)
    (root / "ct_case/000006/text.txt").write_text("Large hypodense liver lesion.\n")
    (root / "ct_case/000007/text.txt").write_text("")
    pairs = {"train": [{"image": "ct_case/000006/Axial_portal_venous.npy", "text": "ct_case/000006/text.txt"},
                       {"image": "ct_case/000007/Axial_portal_venous.npy", "text": "ct_case/000007/text.txt"},
                       {"image": "ct_case/000099/missing.npy", "text": "ct_case/000099/text.txt"}],
             "validation": [{"image": "ct_case/000006/Axial_portal_venous.npy", "text": "ct_case/000006/text.txt"}]}
    (root / "M3D_Cap.json").write_text(json.dumps(pairs))
    columns = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice"]
    with open(root / "M3D_VQA_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerow(["ct_case/000006/Axial_portal_venous.npy", "...", "1", "Which plane is this image?", "Sagittal",
                    "Axial", "Coronal", "Oblique", "Axial", "B"])
        w.writerow(["ct_case/000006/Axial_portal_venous.npy", "...", "4", "What is abnormal?", "Liver lesion",
                    "Nothing", "", "", "Liver lesion", "E"])
    return root


def test_m3d_cap_records_state_their_missing_geometry(m3d, tmp_path):
    out = tmp_path / "cap"
    report = import_m3d_cap(m3d, out, progress=False)
    (train,) = read_manifest(out / "train.jsonl")
    assert train["answer"] == "Large hypodense liver lesion." and train["image_meta"] == [{"array_axes": "CZYX"}]
    assert len(read_manifest(out / "val.jsonl")) == 1
    problems = [s["problem"] for s in report.skipped]
    assert "empty report text" in problems and any(p.startswith("image not found") for p in problems)
    data = json.loads((out / "import_report.json").read_text())
    assert "no spacing, orientation or HU" in data["geometry"]
    image = load_record_image(train, 0, resolve_images(train, out / "train.jsonl")[0])
    assert tuple(image.shape) == (1, 5, 6, 4) and image.meta["geometry_known"] is False  # (C, W, H, D)
    np.testing.assert_allclose(np.asarray(image.affine), np.eye(4))


def test_m3d_vqa_closed_and_open_records(m3d, tmp_path, capsys):
    out = tmp_path / "vqa"
    import_m3d_vqa(m3d, out, csv_paths={"test": m3d / "M3D_VQA_test.csv"}, progress=False)
    closed, open_ = read_manifest(out / "test.jsonl")
    assert closed["answer"] == "B. Axial" and closed["choices"] == ["A. Sagittal", "B. Axial", "C. Coronal",
                                                                     "D. Oblique"]
    assert closed["question_type"] == "plane" and open_["answer"] == "Axial" and open_["task"] == "vqa_open"
    data = json.loads((out / "import_report.json").read_text())
    assert data["skipped_items"][0]["where"] == "M3D_VQA_test.csv:row 3"
    assert radfm3d_main(["import", "m3d-vqa", "--root", str(m3d), "--out", str(tmp_path / "v2"), "--csv",
                         "test=M3D_VQA_test.csv", "--closed-only", "--no-progress"]) == 0
    assert len(read_manifest(tmp_path / "v2" / "test.jsonl")) == 1
    assert radfm3d_main(["import", "m3d-cap", "--root", str(tmp_path), "--out", str(tmp_path / "c2"),
                         "--no-progress"]) == 2
    assert "no M3D-Cap JSON" in capsys.readouterr().err


def test_an_imported_manifest_evaluates_unchanged(m3d, tmp_path, tiny_model_dir):
    """radfm3d evaluate --model runs on an imported manifest: the records' image_meta (M3D's array layout) is applied
    when the images are read, every record gets a prediction, closed questions get choice likelihoods."""
    from radfm3d.evaluation.harness import cli as evaluate_cli, read_predictions

    out = tmp_path / "vqa"
    import_m3d_vqa(m3d, out, csv_paths={"test": m3d / "M3D_VQA_test.csv"}, progress=False)
    assert evaluate_cli(["--manifest", str(out / "test.jsonl"), "--model", str(tiny_model_dir), "--out",
                         str(tmp_path / "eval"), "--no-blind", "--no-embeddings", "--n-resamples", "20",
                         "--max-new-tokens", "2"]) == 0
    predictions = read_predictions(tmp_path / "eval" / "predictions.jsonl")
    assert sorted(predictions) == ["m3d-vqa-test-2-closed", "m3d-vqa-test-2-open"]
    assert len(predictions["m3d-vqa-test-2-closed"]["choice_logliks"]) == 4
