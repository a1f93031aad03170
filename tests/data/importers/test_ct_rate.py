# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import ct-rate`` on a tiny copy of CT-RATE's published layout: three volumes of two patients, one whose
NIfTI header spacing and rescale disagree with its metadata row, one missing on disk, malformed label rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radfm3d.cli import main as radfm3d_main
from radfm3d.data.importers.ct_rate import CT_RATE_ABNORMALITIES, import_ct_rate
from radfm3d.data.image_meta import load_record_image
from radfm3d.data.manifest import read_manifest, resolve_images

_REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
_META_COLUMNS = ["VolumeName", "Manufacturer", "Rows", "Columns", "XYSpacing", "ZSpacing", "RescaleIntercept",
                 "RescaleSlope", "PatientSex", "PatientAge"]


def _write_csv(path: Path, columns, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(rows)


def _volume(path: Path, zooms, in_hu: bool) -> None:
    """Stored CT values (0..2550, no header rescale) or the same already in HU (-1024..1526)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4) * 10 - (1024 if in_hu else 0)
    image = nib.Nifti1Image(raw.astype(np.int16), np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    nib.save(image, str(path))


@pytest.fixture()
def ct_rate(tmp_path) -> Path:
    root = tmp_path / "CT-RATE"
    ds = root / "dataset"
    # train_1_a_1: stored values, header 1 mm isotropic; the metadata says 0.7 x 0.7 x 1.5 mm and intercept -1024
    _volume(ds / "train_fixed/train_1/train_1_a/train_1_a_1.nii.gz", (1.0, 1.0, 1.0), in_hu=False)
    # train_1_a_2: already in HU, header spacing agrees with the metadata
    _volume(ds / "train_fixed/train_1/train_1_a/train_1_a_2.nii.gz", (0.7, 0.7, 1.5), in_hu=True)
    # valid_7_b_1: a validation volume in HU, header right
    _volume(ds / "valid_fixed/valid_7/valid_7_b/valid_7_b_1.nii.gz", (0.8, 0.8, 2.0), in_hu=True)
    meta = [["train_1_a_1.nii.gz", "PHILIPS", 8, 8, "[0.7, 0.7]", 1.5, -1024, 1, "M", "061Y"],
            ["train_1_a_2.nii.gz", "PHILIPS", 8, 8, "[0.7, 0.7]", 1.5, -1024, 1, "M", "061Y"],
            ["train_3_a_1.nii.gz", "SIEMENS", 8, 8, "[0.7, 0.7]", 1.5, -1024, 1, "F", "050Y"]]  # not on disk
    _write_csv(ds / "metadata/train_metadata.csv", _META_COLUMNS, meta)
    _write_csv(ds / "metadata/validation_metadata.csv", _META_COLUMNS,
               [["valid_7_b_1.nii.gz", "GE", 8, 8, "[0.8, 0.8]", 2.0, -1024, 1, "F", "070Y"]])
    reports = [["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", "Right lower lobe nodule of 6 mm.", "Nodule."],
               ["train_1_a_2.nii.gz", "Not given.", "Non-contrast.", "No pleural effusion.", "Normal study."]]
    _write_csv(ds / "radiology_text_reports/train_reports.csv", _REPORT_COLUMNS, reports)
    _write_csv(ds / "radiology_text_reports/validation_reports.csv", _REPORT_COLUMNS,
               [["valid_7_b_1.nii.gz", "Dyspnea.", "Contrast.", "Bilateral pleural effusion.", "Effusions."]])
    flags = {name: 0 for name in CT_RATE_ABNORMALITIES}
    nodule = {**flags, "Lung nodule": 1}
    _write_csv(ds / "multi_abnormality_labels/train_predicted_labels.csv", ["VolumeName", *CT_RATE_ABNORMALITIES],
               [["train_1_a_1.nii.gz", *nodule.values()], ["train_1_a_2.nii.gz", *(["x"] + [0] * 17)]])
    _write_csv(ds / "multi_abnormality_labels/valid_predicted_labels.csv", ["VolumeName", *CT_RATE_ABNORMALITIES],
               [["valid_7_b_1.nii.gz", *{**flags, "Pleural effusion": 1}.values()]])
    return root


def test_ct_rate_records_labels_geometry_and_report(ct_rate, tmp_path):
    out = tmp_path / "out"
    report = import_ct_rate(ct_rate, out, progress=False)
    train = {r["id"]: r for r in read_manifest(out / "train.jsonl")}
    valid = {r["id"]: r for r in read_manifest(out / "valid.jsonl")}
    first = train["train_1_a_1.nii.gz-report"]
    assert first["answer"] == "Findings: Right lower lobe nodule of 6 mm. Impression: Nodule."
    assert "Clinical information: Cough." in first["prompt"] and first["prompt"].startswith("<image>")
    assert first["labels"]["Lung nodule"] == 1 and sum(first["labels"].values()) == 1
    assert first["patient_id"] == "train_1" and first["study_id"] == "train_1_a"
    # geometry and HU from the metadata where the header disagrees
    assert first["image_meta"] == [{"spacing_mm": [0.7, 0.7, 1.5], "stored_to_hu": [1.0, -1024.0]}]
    second = train["train_1_a_2.nii.gz-report"]
    assert second["image_meta"] == [{"stored_to_hu": [1.0, -1024.0]}]
    # read back: the stored volume gets the metadata's spacing and HU; the HU volume keeps its values
    image = load_record_image(first, 0, resolve_images(first, out / "train.jsonl")[0])
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0), [0.7, 0.7, 1.5], rtol=1e-6)
    assert float(image.min()) == -1024.0 and image.meta["image_meta_applied"] == ["spacing_mm", "stored_to_hu"]
    hu = load_record_image(second, 0, resolve_images(second, out / "train.jsonl")[0])
    assert float(hu.min()) == -1024.0 and hu.meta["image_meta_applied"] == []
    nodule_q = train["train_1_a_1.nii.gz-vqa-lung_nodule"]
    assert nodule_q["answer"] == "Yes." and nodule_q["choices"] == ["Yes.", "No."]
    assert sum(1 for r in train.values() if r["task"] == "vqa_presence") == 18  # the second volume's labels are bad
    assert valid["valid_7_b_1.nii.gz-vqa-pleural_effusion"]["answer"] == "Yes."
    data = json.loads((out / "import_report.json").read_text())
    assert data["records"] == {"train": {"report": 2, "vqa_presence": 18}, "valid": {"report": 1, "vqa_presence": 18}}
    problems = " | ".join(f"{s['where']}: {s['problem']}" for s in data["skipped_items"])
    assert "train_metadata.csv:row 4: volume not found" in problems
    assert "label 'Medical material' is 'x', not 0/1" in problems
    notes = [n for n in data["notes"] if n["where"] == "train_1_a_1.nii.gz"]
    assert len(notes) == 2 and data["geometry_fixes"] == 4
    assert data["label_prevalence"]["valid"]["Pleural effusion"] == 1.0
    from radfm3d.findings.labels import structured_records
    from radfm3d.findings.schema import load_schema

    schema = load_schema(out / "label_schema.json")
    assert schema.flags == CT_RATE_ABNORMALITIES and schema.outputs == ("flags",)
    (case,) = structured_records(out / "cases.jsonl", schema, split="train")  # the second volume's labels are bad
    assert case["id"] == "train_1_a_1.nii.gz" and case["image"].endswith("train_1_a_1.nii.gz")
    assert case["label"]["flags"][CT_RATE_ABNORMALITIES.index("Lung nodule")] == 1.0
    assert float(case["label"]["flags"].sum()) == 1.0
    assert report.summary_line().startswith("39 records")


def test_ct_rate_resume_reuses_finished_volumes(ct_rate, tmp_path, capsys):
    out = tmp_path / "out"
    assert radfm3d_main(["import", "ct-rate", "--root", str(ct_rate), "--out", str(out), "--split", "train",
                         "--no-progress"]) == 0
    before = (out / "train.jsonl").read_bytes()
    state = out / ".import_state" / "ct_rate_volumes.jsonl"
    assert len(state.read_text().splitlines()) == 2
    again = import_ct_rate(ct_rate, out, splits=("train",), progress=False)
    assert (out / "train.jsonl").read_bytes() == before
    assert len(state.read_text().splitlines()) == 2  # nothing read again
    assert again.to_dict()["total_records"] == 20
    assert radfm3d_main(["import", "ct-rate", "--root", str(tmp_path), "--out", str(out), "--no-progress"]) == 2
    assert "not a CT-RATE folder" in capsys.readouterr().err
