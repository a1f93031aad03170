# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from radfm3d.data.phantoms import FINDING_TYPES
from radfm3d.data.structured_labels import STRUCTURES, labels_for_image, structured_records
from radfm3d.errors import RadFM3DInputError


@pytest.fixture(scope="module")
def cases(structured_phantoms: Path) -> Path:
    return structured_phantoms


def _cases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_structures_cover_every_named_organ():
    assert len(STRUCTURES) == 13 and len(set(STRUCTURES)) == 13
    assert {"liver", "left_lung", "right_hemisphere", "spine"} <= set(STRUCTURES)


def test_labels_match_the_case(cases: Path):
    for case in _cases(cases):
        lab = labels_for_image(case)
        assert lab["modality"].item() == ("CT", "T1", "T2").index("CT" if case["modality"] == "CT" else case["sequence"])
        assert lab["region"].item() == ("head", "chest", "abdomen").index(case["region"])
        assert lab["total_count"].item() == min(3, len(case["findings"]))
        present = {STRUCTURES[i] for i in torch.nonzero(lab["structure_present"]).flatten().tolist()}
        assert present == {o["structure"] for o in case["organs"]}
        size = case["grid_geometry"]["spatial_size"]
        for organ in case["organs"]:
            i = STRUCTURES.index(organ["structure"])
            expected = [min(1.0, max(0.0, v / s)) for v, s in zip(organ["box_grid"], size * 2)]
            assert lab["structure_box"][i].tolist() == pytest.approx(expected, abs=1e-6)
        assert int(lab["finding_mask"].sum()) == len({(f["organ"], f["side"]) for f in case["findings"]})
        for f in case["findings"]:
            i = next(i for i, s in enumerate(STRUCTURES)
                     if any(o["structure"] == s and o["organ"] == f["organ"] and o["side"] == f["side"]
                            for o in case["organs"]))
            assert lab["finding_present"][i] == 1 and lab["finding_count"][i] >= 1
            biggest = max((g for g in case["findings"] if (g["organ"], g["side"]) == (f["organ"], f["side"])),
                          key=lambda g: g["size_mm"])
            assert lab["finding_type"][i].item() == FINDING_TYPES.index(biggest["type"])
            assert lab["finding_size"][i].item() == pytest.approx(math.log(biggest["size_mm"] / 10.0), abs=1e-5)
        slots = [t for t in lab["findings_type"].tolist() if t != -100]
        by_size = sorted(case["findings"], key=lambda g: -g["size_mm"])[: len(slots)]
        assert slots == [FINDING_TYPES.index(f["type"]) for f in by_size]
        assert len(slots) == min(len(case["findings"]), lab["findings_box"].shape[0])
        outside = lab["structure_present"] == 0
        assert (lab["finding_count"][outside] == -100).all() and (lab["finding_type"][outside] == -100).all()


def test_records_include_priors_with_their_own_findings(cases: Path):
    all_cases = _cases(cases)
    records = structured_records(cases, split=None)
    with_prior = [c for c in all_cases if c.get("prior")]
    assert with_prior, "fixture should contain priors"
    assert len(records) == len(all_cases) + len(with_prior)
    prior_rec = next(r for r in records if r["id"].endswith("-prior"))
    assert prior_rec["image"].endswith("-prior.nii.gz") and Path(prior_rec["image"]).is_file()
    assert prior_rec["label"]["structure_box_mask"].sum() == 0  # organ boxes are given on the current grid only
    assert len(structured_records(cases, split=None, include_priors=False)) == len(all_cases)


def test_bad_cases_file_is_named(tmp_path: Path):
    with pytest.raises(RadFM3DInputError, match="not found"):
        structured_records(tmp_path / "missing.jsonl")
    bad = tmp_path / "cases.jsonl"
    bad.write_text('{"id": "x", "split": "train"}\nnot json\n')
    with pytest.raises(RadFM3DInputError, match="line 1"):
        structured_records(bad)
    bad.write_text('{"id": "x", "split": "train", "images": {"image": "a.nii.gz"}, "modality": "CT"}\n{oops\n')
    with pytest.raises(RadFM3DInputError, match="cases.jsonl"):
        structured_records(bad)
