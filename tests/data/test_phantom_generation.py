# Copyright (c) radfm3d contributors. Apache-2.0.
"""`radfm3d phantoms` end to end on tiny volumes: sharded files, manifests, splits, DICOM copies, byte-identical
files for a seed whatever the worker count, resuming an interrupted run, and a failing case that costs no other."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from radfm3d.data.manifest import read_manifest
from radfm3d.data.phantoms import cli, generate_phantoms, split_of

TINY = ["--matrix", "32,48", "--slices", "8,12", "--no-progress"]


def _files(root: Path) -> dict[str, int]:
    """Relative path -> mtime_ns of every file under the case folders."""
    out = {}
    for top in ("images", "dicom", "meta"):
        for p in (root / top).rglob("*"):
            if p.is_file():
                out[str(p.relative_to(root))] = p.stat().st_mtime_ns
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    assert cli(["--n", "6", "--out", str(out), "--seed", "1", "--workers", "2", "--dicom-fraction", "0.5", *TINY]) == 0
    return out


def test_outputs_manifests_and_splits(run_dir):
    cases = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    assert [c["id"] for c in cases] == [f"case-{i:06d}" for i in range(6)]
    for i, c in enumerate(cases):
        assert (run_dir / "images" / "shard-000" / f"case-{i:06d}.nii.gz").is_file()
        assert (run_dir / "meta" / "shard-000" / f"case-{i:06d}.json").is_file()
        assert c["split"] == split_of(1, i)
    dicom_cases = [c for c in cases if c["dicom"]]
    assert dicom_cases, "a DICOM fraction of 0.5 gives DICOM copies"
    all_ids = set()
    for split in ("train", "val", "test"):
        recs = read_manifest(run_dir / f"{split}.jsonl", check_files=True)  # validates, paths relative to folder
        for r in recs:
            assert next(c for c in cases if c["id"] == r["case_id"])["split"] == split
            all_ids.add(r["case_id"])
    assert all_ids == {c["id"] for c in cases}
    # DICOM cases point their records at the series, which reads back with the NIfTI's geometry
    from radfm3d.io import load_image

    c = dicom_cases[0]
    recs = [r for s in ("train", "val", "test") for r in read_manifest(run_dir / f"{s}.jsonl")
            if r["case_id"] == c["id"]]
    assert recs[0]["images"][0] == c["images"]["dicom"]
    dcm = load_image(run_dir / c["images"]["dicom"])
    nii = load_image(run_dir / c["images"]["nifti"])
    pts = np.array([[0, 0, 0], [3, 5, 2], [7, 1, 4]], dtype=float)
    w_n = pts @ nii.affine.numpy()[:3, :3].T + nii.affine.numpy()[:3, 3]
    inv = np.linalg.inv(dcm.affine.numpy())
    d_idx = np.rint(w_n @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    np.testing.assert_allclose(dcm[0].numpy()[tuple(d_idx.T)], nii[0].numpy()[tuple(pts.astype(int).T)])
    summary = json.loads((run_dir / "dataset.json").read_text())
    assert summary["generated"] == 6 and summary["volumes"] >= 6
    assert (run_dir / "preprocessing.json").is_file()


def _bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file of a set except the run summary (it holds timings)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "dataset.json"}


def test_same_seed_writes_byte_identical_files_whatever_the_worker_count(run_dir, tmp_path):
    """NIfTI, DICOM (UIDs derived from the seed, no dates), sidecars and manifests: the same bytes for the same
    seed, generated in another folder, at another time, by one process instead of two."""
    generate_phantoms(tmp_path, 6, 1, workers=1, dicom_fraction=0.5, matrix=(32, 48), slices=(8, 12), progress=False)
    a, b = _bytes(run_dir), _bytes(tmp_path)
    assert sorted(a) == sorted(b)
    assert sum(name.endswith(".dcm") for name in a) >= 8, "the set holds DICOM series"
    assert [name for name in a if a[name] != b[name]] == []
    import pydicom

    dcm = sorted(run_dir.glob("dicom/shard-000/case-*/slice_*.dcm"))
    first, second = pydicom.dcmread(dcm[0]), pydicom.dcmread(dcm[1])
    assert first.SOPInstanceUID != second.SOPInstanceUID and first.SOPInstanceUID.startswith("2.25.")
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert not any(e.VR in ("DA", "TM", "DT") for e in first.iterall()), "no dates or times are written"
    # another seed gives other UIDs
    other = tmp_path / "seed2"
    generate_phantoms(other, 1, 2, dicom_fraction=1.0, matrix=(32, 32), slices=(8, 8), progress=False)
    assert pydicom.dcmread(next(other.glob("dicom/*/*/slice_0000.dcm"))).StudyInstanceUID != first.StudyInstanceUID


def test_a_failing_case_is_reported_and_the_others_are_written(tmp_path, capsys):
    """A case whose NIfTI cannot be written (a folder is in the way) fails alone: the other cases and the
    manifests are written, the failure is recorded and printed, the exit status is 1; a rerun finishes the set."""
    blocker = tmp_path / "images" / "shard-000" / "case-000001.nii.gz"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("not a volume")
    args = ["--n", "3", "--out", str(tmp_path), "--seed", "5", "--workers", "2", "--dicom-fraction", "0", *TINY]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "1 of 3 cases failed" in err and "case-000001 (images/shard-000/case-000001.nii.gz)" in err
    summary = json.loads((tmp_path / "dataset.json").read_text())
    failed = [(f["case"], f["file"]) for f in summary["failed"]]
    assert failed == [("case-000001", "images/shard-000/case-000001.nii.gz")]
    assert "IsADirectoryError" in summary["failed"][0]["error"] or "Errno" in summary["failed"][0]["error"]
    assert summary["generated"] == 2
    cases = [json.loads(line)["id"] for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert cases == ["case-000000", "case-000002"]
    records = [r for s in ("train", "val", "test") for r in read_manifest(tmp_path / f"{s}.jsonl", check_files=True)]
    assert {r["case_id"] for r in records} == {"case-000000", "case-000002"}
    assert not (tmp_path / "meta/shard-000/case-000001.json").exists()

    import shutil

    shutil.rmtree(blocker)
    assert cli(args) == 0
    summary = json.loads((tmp_path / "dataset.json").read_text())
    assert (summary["generated"], summary["skipped"], summary.get("failed")) == (1, 2, None)
    cases = [json.loads(line)["id"] for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert cases == ["case-000000", "case-000001", "case-000002"]


def test_resume_rewrites_only_missing_cases(run_dir):
    before = _files(run_dir)
    manifests = {n: (run_dir / n).read_text() for n in ("cases.jsonl", "train.jsonl", "val.jsonl", "test.jsonl")}
    shard = run_dir / "images" / "shard-000"
    sidecar3 = (run_dir / "meta/shard-000/case-000003.json").read_text()
    os.remove(shard / "case-000003.nii.gz")                          # a deleted output
    os.remove(run_dir / "meta/shard-000/case-000005.json")           # interrupted before its sidecar
    (shard / ".case-000004.tmp-99999.nii.gz").write_bytes(b"\x1f\x8b half")  # half-written temporary
    tmp_dir = run_dir / "dicom/shard-000/.case-000000.tmp-99999"
    tmp_dir.mkdir(parents=True)
    (tmp_dir / "slice_0000.dcm").write_bytes(b"partial")

    summary = generate_phantoms(run_dir, 6, 1, workers=2, dicom_fraction=0.5, matrix=(32, 48), slices=(8, 12),
                                progress=False)
    assert (summary["generated"], summary["skipped"], summary["removed_temporaries"]) == (2, 4, 2)
    after = _files(run_dir)
    assert not [p for p in after if ".tmp-" in p]
    assert not list(run_dir.glob("**/.*tmp-*"))
    rewritten = {p for p in before if after.get(p) != before[p]}
    assert rewritten and all(("case-000003" in p or "case-000005" in p) for p in rewritten), rewritten
    assert "images/shard-000/case-000003.nii.gz" in rewritten and "meta/shard-000/case-000005.json" in rewritten
    assert set(after) == set(before)
    assert (run_dir / "meta/shard-000/case-000003.json").read_text() == sidecar3
    for name, text in manifests.items():
        assert (run_dir / name).read_text() == text, name


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["--n", "2", "--out", str(tmp_path), "--grid", "128,128"])
    assert cli(["--n", "1", "--out", str(tmp_path), "--tasks", "report,telepathy", *TINY]) == 2
    assert "telepathy" in capsys.readouterr().err
