# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import dicom-export`` on a small hospital-style export: two patients, nested and flat folders, mixed
series (CT axial, MR sagittal, a localizer, a structured report), a real pydicom CT slice, junk files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from radfm3d.cli import main as radfm3d_main
from radfm3d.data.importers.dicom_export import import_dicom_export
from radfm3d.data.manifest import read_manifest, resolve_images
from radfm3d.io import load_image, save_dicom_series


def _volume(shape, affine):
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 200 - 100
    return load_image(data[None], affine=affine)


def _set(paths, **tags):
    for p in paths:
        ds = pydicom.dcmread(p)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(p)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    axial = np.diag([0.8, 0.8, 2.5, 1.0])
    axial[:3, 3] = (-20.0, -30.0, 40.0)
    # patient A, nested: PAT_A/STUDY1/SE1 (CT axial, 6 slices), SE2 (localizer), SE3 (SR without pixels)
    ct = save_dicom_series(_volume((10, 12, 6), axial), root / "PAT_A" / "STUDY1" / "SE1", modality="CT",
                           study_uid="1.2.826.0.1.3680043.10.1", series_uid="1.2.826.0.1.3680043.10.1.1",
                           patient_id="A", description="ABD PORTAL")
    _set(ct, AccessionNumber="ACC1", BodyPartExamined="ABDOMEN", SeriesNumber=2)
    loc = save_dicom_series(_volume((10, 12, 1), axial), root / "PAT_A" / "STUDY1" / "SE2", modality="CT",
                            study_uid="1.2.826.0.1.3680043.10.1", series_uid="1.2.826.0.1.3680043.10.1.2",
                            patient_id="A", description="SCOUT")
    _set(loc, AccessionNumber="ACC1", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesNumber=1)
    sr = pydicom.dcmread(ct[0])
    for tag in ("PixelData", "Rows", "Columns"):
        delattr(sr, tag)
    sr.Modality, sr.SeriesInstanceUID = "SR", "1.2.826.0.1.3680043.10.1.3"
    (root / "PAT_A" / "STUDY1" / "SE3").mkdir()
    sr.save_as(root / "PAT_A" / "STUDY1" / "SE3" / "report.dcm")
    # patient B, flat folder: a sagittal MR series and an axial CT series of one study, mixed in one folder
    sagittal = np.zeros((4, 4))
    sagittal[:3, 0], sagittal[:3, 1], sagittal[:3, 2] = (0, 1.0, 0), (0, 0, 1.0), (4.0, 0, 0)
    sagittal[3, 3] = 1.0
    flat = root / "FLAT"
    mr = save_dicom_series(_volume((8, 9, 5), sagittal), root / "tmp_mr", modality="MR",
                           study_uid="1.2.826.0.1.3680043.10.2", series_uid="1.2.826.0.1.3680043.10.2.1",
                           patient_id="B", description="T2 SAG")
    ct2 = save_dicom_series(_volume((10, 12, 4), axial), root / "tmp_ct", modality="CT",
                            study_uid="1.2.826.0.1.3680043.10.2", series_uid="1.2.826.0.1.3680043.10.2.2",
                            patient_id="B", description="CHEST")
    _set(mr + ct2, AccessionNumber="ACC2")
    flat.mkdir()
    for i, p in enumerate(mr + ct2):
        shutil.move(str(p), flat / f"IM{i:05d}")
    shutil.rmtree(root / "tmp_mr")
    shutil.rmtree(root / "tmp_ct")
    # a real CT slice written by another tool (pydicom's test data), its own study
    (root / "OTHER").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "OTHER" / "ct_small.dcm")
    # junk the walk must survive
    (root / "PAT_A" / "notes.txt").write_text("not dicom")
    (root / "FLAT" / "EMPTY").write_bytes(b"")
    return root


def _reports_csv(path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["AccessionNumber", "report"])
        w.writerow(["ACC1", "Liver normal. No free fluid."])
        w.writerow(["", "orphan row without a key"])
        w.writerow(["ACC2", "Small right pleural effusion."])
        w.writerow(["ACC9", "a study that is not in the export"])
    return path


def test_dicom_export_groups_studies_and_describes_series(export, tmp_path):
    out = tmp_path / "out"
    report = import_dicom_export(export, out, reports=_reports_csv(tmp_path / "reports.csv"), progress=False)
    records = {r["study_id"]: r for r in read_manifest(out / "manifest.jsonl")}
    assert set(records) == {"1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.2",
                            str(pydicom.dcmread(get_testdata_file("CT_small.dcm")).StudyInstanceUID)}
    a = records["1.2.826.0.1.3680043.10.1"]
    assert a["answer"] == "Liver normal. No free fluid." and a["patient_id"] == "A" and a["task"] == "report"
    assert len(a["images"]) == 1 and "image_series" not in a  # localizer and SR left out; the folder is the series
    (series,) = a["study"]["series"]
    assert series["orientation"] == "axial" and series["images"] == 6 and series["body_part"] == "ABDOMEN"
    assert series["pixel_spacing_mm"] == [0.8, 0.8] and series["slice_spacing_mm"] == pytest.approx(2.5)
    b = records["1.2.826.0.1.3680043.10.2"]
    assert b["answer"] == "Small right pleural effusion." and b["modality"] in ("MR+CT", "CT+MR")
    assert {s["orientation"] for s in b["study"]["series"]} == {"sagittal", "axial"}
    assert sorted(b["image_series"]) == ["1.2.826.0.1.3680043.10.2.1", "1.2.826.0.1.3680043.10.2.2"]
    assert b["prompt"].count("<image>") == 2
    # the record names what load_image reads: the right series with its geometry in world mm
    paths = resolve_images(b, out / "manifest.jsonl")
    mr_index = b["image_series"].index("1.2.826.0.1.3680043.10.2.1")
    image = load_image(paths[mr_index], series_uid=b["image_series"][mr_index])
    assert image.shape[1:] == (8, 9, 5)
    np.testing.assert_allclose(np.abs(np.asarray(image.affine))[:3, :3].max(axis=0), [1.0, 1.0, 4.0], atol=1e-4)
    data = json.loads((out / "import_report.json").read_text())
    reasons = " | ".join(s["problem"] for s in data["skipped_items"])
    assert "not a DICOM file" in reasons and "empty file" in reasons and "localizer series" in reasons
    assert "not an image: SR object" in reasons and "reports CSV row without" in reasons
    assert data["records"] == {"manifest": {"report": 3}}
    assert report.extra["files_scanned"] == 20  # 6 + 1 + 1 + 5 + 4 + 1 + 2 junk
    assert "Import report: dicom-export" in (out / "report.md").read_text()


def test_dicom_export_resumes_from_stored_headers_and_rereads_changed_files(export, tmp_path):
    out = tmp_path / "out"
    first = import_dicom_export(export, out, progress=False, split_fractions=(0.5, 0.25, 0.25))
    assert first.extra["headers_reused_from_earlier_run"] == 0
    state = out / ".import_state" / "dicom_headers.jsonl"
    with open(state, "a") as fh:
        fh.write('{"key": "torn li')  # a kill in the middle of a line
    again = import_dicom_export(export, out, progress=False, split_fractions=(0.5, 0.25, 0.25))
    assert again.extra["headers_reused_from_earlier_run"] == again.extra["files_scanned"]
    # splits are per patient and stable across runs
    assert first.to_dict()["records"] == again.to_dict()["records"]
    patients = {}
    for manifest in out.glob("*.jsonl"):
        for rec in read_manifest(manifest):
            patients.setdefault(rec["patient_id"], set()).add(manifest.stem)
    assert all(len(s) == 1 for s in patients.values())


def test_dicom_export_cli_bounds_and_bad_out(export, tmp_path, capsys):
    assert radfm3d_main(["import", "dicom-export", "--root", str(export), "--out", str(tmp_path / "o"),
                         "--max-files", "5", "--no-progress"]) == 2
    assert "more than 5 files" in capsys.readouterr().err
    assert radfm3d_main(["import", "dicom-export", "--root", str(export), "--out", str(tmp_path / "o"),
                         "--max-depth", "1", "--no-progress"]) == 2
    assert "deeper than 1 levels" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert radfm3d_main(["import", "dicom-export", "--root", str(export), "--out", str(tmp_path / "afile"),
                         "--no-progress"]) == 2
    assert "existing file" in capsys.readouterr().err
    assert radfm3d_main(["import", "dicom-export", "--root", str(export), "--out", str(tmp_path / "ok"),
                         "--no-progress"]) == 0
    assert (tmp_path / "ok" / "manifest.jsonl").is_file()


def test_dicom_export_killed_mid_scan_resumes_to_the_same_manifest(tmp_path):
    """SIGKILL while headers are being read (not at a convenient moment), then rerun: the stored headers are reused,
    nothing is lost, and the manifest equals that of an uninterrupted import."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "export"
    axial = np.diag([0.8, 0.8, 2.5, 1.0])
    for study in range(6):
        save_dicom_series(_volume((6, 6, 40), axial), root / f"P{study}" / "ST" / "SE", modality="CT",
                          study_uid=f"1.2.826.0.1.3680043.10.9.{study}", patient_id=f"P{study}")
    clean = tmp_path / "clean"
    import_dicom_export(root, clean, progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-m", "radfm3d.cli", "import", "dicom-export", "--root", str(root),
                              "--out", str(out), "--no-progress"], env=env, stderr=subprocess.DEVNULL)
    state = out / ".import_state" / "dicom_headers.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if state.is_file() and len(state.read_bytes().splitlines()) >= 30:
            break
        time.sleep(0.005)
    killed = child.poll() is None
    if killed:
        child.send_signal(signal.SIGKILL)
    child.wait()
    assert killed, "the import finished before it could be killed; make the fixture larger"
    assert not (out / "manifest.jsonl").exists()  # nothing half-written under the final name
    resumed = import_dicom_export(root, out, progress=False)
    assert resumed.extra["headers_reused_from_earlier_run"] >= 30
    assert (out / "manifest.jsonl").read_text() == (clean / "manifest.jsonl").read_text()
