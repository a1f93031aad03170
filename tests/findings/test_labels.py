# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from radfm3d.errors import RadFM3DInputError
from radfm3d.findings.labels import labels_for_image, structured_records


def _cases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_labels_match_the_case(structured_phantoms: Path, phantom_schema):
    schema = phantom_schema
    structures = schema.structures
    for case in _cases(structured_phantoms):
        lab = labels_for_image(case, schema)
        key = "CT" if case["modality"] == "CT" else f"MR/{case['sequence']}"
        assert lab["modality"].item() == schema.modality_case[key]
        assert lab["region"].item() == schema.regions.index(case["region"])
        assert lab["total_count"].item() == min(3, len(case["findings"]))
        present = {structures[i] for i in torch.nonzero(lab["structure_present"]).flatten().tolist()}
        assert present == {o["structure"] for o in case["organs"]}
        size = case["grid_geometry"]["spatial_size"]
        for organ in case["organs"]:
            i = structures.index(organ["structure"])
            expected = [min(1.0, max(0.0, v / s)) for v, s in zip(organ["box_grid"], size * 2)]
            assert lab["structure_box"][i].tolist() == pytest.approx(expected, abs=1e-6)
        assert int(lab["finding_mask"].sum()) == len({(f["organ"], f["side"]) for f in case["findings"]})
        for f in case["findings"]:
            i = next(i for i, s in enumerate(structures)
                     if any(o["structure"] == s and o["organ"] == f["organ"] and o["side"] == f["side"]
                            for o in case["organs"]))
            assert lab["finding_present"][i] == 1 and lab["finding_count"][i] >= 1
            biggest = max((g for g in case["findings"] if (g["organ"], g["side"]) == (f["organ"], f["side"])),
                          key=lambda g: g["size_mm"])
            assert lab["finding_type"][i].item() == schema.finding_types.index(biggest["type"])
            assert lab["finding_size"][i].item() == pytest.approx(math.log(biggest["size_mm"] / 10.0), abs=1e-5)
        outside = lab["structure_present"] == 0
        assert (lab["finding_count"][outside] == -100).all() and (lab["finding_type"][outside] == -100).all()


def test_flag_labels_follow_the_findings(structured_phantoms: Path, flags_schema):
    for case in _cases(structured_phantoms):
        lab = labels_for_image(case, flags_schema)
        assert set(lab) == {"flags"} and lab["flags"].shape == (len(flags_schema.flags),)
        expected = {f"{f['organ']}_{f['type']}" for f in case["findings"]}
        assert {flags_schema.flags[i] for i in torch.nonzero(lab["flags"]).flatten().tolist()} == expected


def test_structure_only_labels(structured_phantoms: Path, structures_schema):
    case = _cases(structured_phantoms)[0]
    lab = labels_for_image(case, structures_schema)
    assert set(lab) == {"modality", "region", "structure_present", "structure_box", "structure_box_mask"}


def test_records_include_priors_with_their_own_findings(structured_phantoms: Path, phantom_schema):
    records = structured_records(structured_phantoms, phantom_schema, split=None)
    cases = _cases(structured_phantoms)
    priors = [r for r in records if r["id"].endswith("-prior")]
    assert len(records) == len(cases) + len(priors) and priors
    for r in priors:
        case = next(c for c in cases if c["id"] == r["id"][: -len("-prior")])
        assert r["label"]["structure_box_mask"].sum() == 0
        sites = {(f["organ"], f["side"]) for f in case["prior"]["findings"]}
        assert int(r["label"]["finding_mask"].sum()) == len(sites)
        assert Path(r["image"]).is_file()


def test_bad_cases_file_is_named(tmp_path: Path, phantom_schema):
    with pytest.raises(RadFM3DInputError, match="not found"):
        structured_records(tmp_path / "missing.jsonl", phantom_schema)
    bad = tmp_path / "cases.jsonl"
    bad.write_text('{"id": "x", "split": "train", "images": {"image": "a.nii.gz"}}\n')
    with pytest.raises(RadFM3DInputError, match="line 1"):
        structured_records(bad, phantom_schema)
    bad.write_text("{oops\n")
    with pytest.raises(RadFM3DInputError, match="line 1: invalid JSON"):
        structured_records(bad, phantom_schema)
