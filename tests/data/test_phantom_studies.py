# Copyright (c) radfm3d contributors. Apache-2.0.
"""Multi-series phantom studies: one anatomy and one set of findings as CT, MR T1 and MR T2 (same world boxes,
modality-specific contrast), deterministic, additive to a set (the cases' files are the same with or without
studies), and report sentences tagged with their structure's box."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radfm3d.data.manifest import read_manifest, validate_manifest
from radfm3d.data.phantoms import (
    STUDY_SERIES, build_records, build_study_records, generate_phantoms, render_case, render_study,
)

SMALL = {"matrix": (32, 48), "slices": (8, 12), "grid": (32, 32, 8)}


def _inside(points: np.ndarray, box) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64)
    return np.all((points >= b[:3] - 1e-6) & (points <= b[3:] + 1e-6), axis=-1)


def _world(scan, ijk: np.ndarray) -> np.ndarray:
    return ijk @ scan.affine[:3, :3].T + scan.affine[:3, 3]


def test_series_share_the_anatomy_and_the_findings():
    scans, gt = render_study(4, 1, n_findings=3, **SMALL)
    assert [(s["modality"], s["sequence"]) for s in gt["series"]] == list(STUDY_SERIES)
    assert [s.modality for s in scans] == ["CT", "MR", "MR"]
    findings = [s["findings"] for s in gt["series"]]
    assert len(findings[0]) >= 1
    for other in findings[1:]:
        assert [(f["type"], f["organ"], f["side"], f["box_world_mm"], f["size_mm"]) for f in other] == \
            [(f["type"], f["organ"], f["side"], f["box_world_mm"], f["size_mm"]) for f in findings[0]]
    # every series sees each finding where its world box says, through its own geometry
    for scan in scans:
        for k, f in enumerate(scan.findings):
            voxels = np.argwhere(scan.labels == k + 1).astype(float)
            if f["n_voxels"]:
                assert _inside(_world(scan, voxels), f["box_world_mm"]).all()
    # the same field of view for every series, so the organ boxes hold for all of them
    extents = [np.asarray(s.acquisition.world_extent()) for s in scans]
    for e in extents[1:]:
        np.testing.assert_allclose(e, extents[0], atol=1e-6)


def test_ct_and_mr_appearance_differ():
    scans, gt = render_study(5, 0, region="abdomen", n_findings=0, **SMALL)
    ct, t1, t2 = scans
    assert ct.array.min() <= -900 and t1.array.min() >= 0 and t2.array.min() >= 0

    def mean_near(scan, organ: str) -> float:
        centre = np.asarray(next(o for o in gt["organs"] if o["organ"] == organ)["centre_world_mm"])
        ijk = np.argwhere(np.ones(scan.array.shape, dtype=bool)).astype(float)
        near = np.linalg.norm(_world(scan, ijk) - centre, axis=1) < 6.0
        return float(scan.array.reshape(-1)[near].mean())

    # tissue table: liver brighter than spleen on T1, darker on T2
    assert mean_near(t1, "liver") > mean_near(t1, "spleen")
    assert mean_near(t2, "liver") < mean_near(t2, "spleen")
    assert not np.array_equal(t1.array.shape, t2.array.shape) or not np.array_equal(t1.array, t2.array)


def test_studies_are_deterministic_and_independent_of_cases():
    a_scans, a_gt = render_study(7, 2, **SMALL)
    b_scans, b_gt = render_study(7, 2, **SMALL)
    assert a_gt == b_gt and all(np.array_equal(a.array, b.array) for a, b in zip(a_scans, b_scans))
    c_scans, c_gt = render_study(7, 3, **SMALL)
    assert c_gt != a_gt
    _, _, case_gt = render_case(7, 2, **SMALL)  # the same seed and index as a case: another anatomy
    assert case_gt["organs"] != a_gt["organs"]
    recs = build_study_records(a_gt, ["ct.nii.gz", "t1.nii.gz", "t2.nii.gz"], rng=np.random.default_rng(0))
    again = build_study_records(b_gt, ["ct.nii.gz", "t1.nii.gz", "t2.nii.gz"], rng=np.random.default_rng(0))
    assert recs == again


def _check_structures(record: dict, gt: dict) -> None:
    structures = record["report_structures"]
    body = record["answer"].replace("FINDINGS: ", "").replace(" IMPRESSION: ", " ")
    for s in structures:
        assert s["text"] in body, s
    organs = {(o["organ"], o["side"]): o["box_world_mm"] for o in gt["organs"]}
    for f in gt["findings"]:
        tagged = [s for s in structures if s["text"].startswith(("There is", "A", "An")) and f["location"] in s["text"]]
        assert tagged and tagged[0]["box_world_mm"] == organs[(f["organ"], f["side"])]
        assert _inside(np.asarray(f["centre_world_mm"])[None], tagged[0]["box_world_mm"]).all()
    for text, key in (("left kidney is unremarkable", ("kidney", "left")), ("liver is unremarkable", ("liver", "none")),
                      ("right lung is clear", ("lung", "right"))):
        for s in structures:
            if text in s["text"]:
                assert s["box_world_mm"] == organs[key] and s["structure"] == "/".join(k for k in key if k != "none")


def test_study_report_and_report_records_carry_structures():
    seen = 0
    for index in range(4):
        _, gt = render_study(9, index, **SMALL)
        (rec,) = build_study_records(gt, ["ct.nii.gz", "t1.nii.gz", "t2.nii.gz"], rng=np.random.default_rng(index))
        validate_manifest([rec])
        assert rec["task"] == "study_report" and rec["prompt"].count("<image>") == 3
        assert rec["image_modalities"] == ["CT", "MR T1", "MR T2"]
        assert rec["study_id"] == gt["study_id"] and rec["patient_id"] == gt["patient_id"]
        assert rec["answer"].startswith("FINDINGS:") and "IMPRESSION:" in rec["answer"]
        _check_structures(rec, gt)
        _, _, case_gt = render_case(9, index, **SMALL)
        report = next(r for r in build_records(case_gt, ["a.nii.gz"], rng=np.random.default_rng(index))
                      if r["task"] == "report")
        assert report["study_id"] == case_gt["case_id"] and report["patient_id"] == f"patient-{case_gt['case_id']}"
        _check_structures(report, case_gt)
        seen += len(gt["findings"]) + len(case_gt["findings"])
    assert seen >= 2


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "dataset.json"}


@pytest.mark.parametrize("workers", [1])
def test_studies_are_additive_in_a_generated_set(tmp_path, workers):
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    kwargs = {"seed": 3, "workers": workers, "dicom_fraction": 0.0, "prior_fraction": 0.5, "progress": False,
              **SMALL}
    generate_phantoms(plain, 3, **kwargs)
    summary = generate_phantoms(mixed, 3, studies=2, **kwargs)
    a, b = _bytes(plain), _bytes(mixed)
    new = sorted(set(b) - set(a))
    assert new == ["images/shard-000/study-000000-ct.nii.gz", "images/shard-000/study-000000-mr-t1.nii.gz",
                   "images/shard-000/study-000000-mr-t2.nii.gz", "images/shard-000/study-000001-ct.nii.gz",
                   "images/shard-000/study-000001-mr-t1.nii.gz", "images/shard-000/study-000001-mr-t2.nii.gz",
                   "meta/shard-000/study-000000.json", "meta/shard-000/study-000001.json", "studies.jsonl"]
    for name, data in a.items():
        if name.endswith(".jsonl") and name != "cases.jsonl":
            assert b[name].startswith(data), name  # the cases' records first, then the studies'
        else:
            assert b[name] == data, name
    assert summary["generated"] == 5 and summary["studies"] == 2
    studies = [r for split in ("train", "val", "test")
               for r in read_manifest(mixed / f"{split}.jsonl", check_files=True) if r["task"] == "study_report"]
    assert sorted(r["study_id"] for r in studies) == ["study-000000", "study-000001"]
    from radfm3d.data.manifest import check_patient_splits

    assert check_patient_splits({s: mixed / f"{s}.jsonl" for s in ("train", "val", "test")}) == []
    # a rerun skips everything
    again = generate_phantoms(mixed, 3, studies=2, **kwargs)
    assert again["generated"] == 0 and again["skipped"] == 5
