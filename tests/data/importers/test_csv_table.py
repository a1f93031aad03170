# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import csv``: column mapping, prompt templates, splits, bad rows reported by row number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radfm3d.cli import main as radfm3d_main
from radfm3d.data.importers.csv_table import import_csv
from radfm3d.data.manifest import read_manifest, resolve_images


@pytest.fixture()
def table(tmp_path) -> Path:
    images = tmp_path / "scans"
    images.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nrrd", "d.nii.gz"):
        (images / name).write_bytes(b"placeholder")  # the importer checks existence only, it never decodes
    rows = ["patient\tscan\tfindings\tsplit\tbody",
            "P1\tscans/a.nii.gz\tNo acute findings.\ttrain\tchest",
            "P1\tscans/b.nii.gz\tStable nodule.\tvalidation\tchest",
            "P2\tscans/missing.nii.gz\tAnything.\ttrain\tchest",
            "P3\tscans/c.nrrd\t\ttest\thead",
            "P4\tscans/d.nii.gz\tCyst.\tholdout\tabdomen",
            "P5\tscans/a.nii.gz;scans/d.nii.gz\tComparison: unchanged.\ttest\tchest"]
    path = tmp_path / "table.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_csv_import_maps_columns_and_reports_bad_rows(table, tmp_path):
    out = tmp_path / "out"
    report = import_csv(table, out, image_column="scan", answer_column="findings", split_column="split",
                        group_column="patient", region_column="body",
                        prompt="Write the {body} CT report.", progress=False)
    train, val, test = (read_manifest(out / f"{s}.jsonl") for s in ("train", "val", "test"))
    assert [r["answer"] for r in train] == ["No acute findings."]
    assert [r["answer"] for r in val] == ["Stable nodule."]
    assert train[0]["prompt"] == "<image> Write the chest CT report." and train[0]["region"] == "chest"
    assert train[0]["patient_id"] == "P1" and train[0]["id"] == "table-row2"
    assert resolve_images(train[0], out / "train.jsonl")[0].resolve() == (tmp_path / "scans" / "a.nii.gz").resolve()
    (two,) = test
    assert two["prompt"].startswith("<image> <image> ") and len(two["images"]) == 2
    skipped = {s["where"]: s["problem"] for s in report.skipped}
    assert skipped["table.tsv:row 4"].startswith("image not found")
    assert skipped["table.tsv:row 5"] == "empty findings"
    assert skipped["table.tsv:row 6"].startswith("unknown split 'holdout'")
    data = json.loads((out / "import_report.json").read_text())
    assert data["total_records"] == 3 and data["skipped"] == 3


def test_csv_import_fraction_splits_keep_patients_together_and_cli_errors(table, tmp_path, capsys):
    out = tmp_path / "out"
    import_csv(table, out, image_column="scan", answer_column="findings", split_fractions=(0.34, 0.33, 0.33),
               group_column="patient", progress=False)
    where = {}
    for manifest in out.glob("*.jsonl"):
        for rec in read_manifest(manifest):
            where.setdefault(rec["patient_id"], set()).add(manifest.stem)
    assert where and all(len(s) == 1 for s in where.values())
    assert radfm3d_main(["import", "csv", "--csv", str(table), "--out", str(tmp_path / "o"),
                         "--image-column", "nope", "--no-progress"]) == 2
    assert "column(s) ['nope'] not in the table" in capsys.readouterr().err
    assert radfm3d_main(["import", "csv", "--csv", str(table), "--out", str(tmp_path / "o"), "--image-column",
                         "scan", "--prompt", "About {missing}:", "--no-progress"]) == 2
    assert "['missing']" in capsys.readouterr().err
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("scan,findings\nscans/a.nii.gz,R\xe9sum\xe9\n".encode("latin-1"))
    assert radfm3d_main(["import", "csv", "--csv", str(bad), "--out", str(tmp_path / "o2"),
                         "--image-column", "scan", "--answer-column", "findings", "--no-progress"]) == 2
    assert "not readable as UTF-8" in capsys.readouterr().err
