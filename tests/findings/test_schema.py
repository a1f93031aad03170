# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import json
from pathlib import Path

import pytest

from radfm3d.data.phantom_schemas import SCHEMAS, check_schema, schema_path
from radfm3d.errors import RadFM3DInputError
from radfm3d.findings.schema import LabelSchema, load_schema


@pytest.mark.parametrize("name", SCHEMAS)
def test_shipped_phantom_schemas_agree_with_the_generator(name):
    assert check_schema(name) == []
    schema = load_schema(schema_path(name))
    assert schema.name == name


def test_phantom_schema_tables(phantom_schema):
    assert len(phantom_schema.structures) == 13 and phantom_schema.modalities[0] == "CT"
    assert phantom_schema.sites(2)[0][0] == phantom_schema.structures.index("liver")
    assert phantom_schema.structure_case["kidney/left"] == "left_kidney"
    assert phantom_schema.phrases["structure:right_hemisphere"] == " right cerebral hemisphere"


def test_flags_schema_is_multi_label_without_structures(flags_schema):
    assert len(flags_schema.flags) >= 12 and not flags_schema.structures and not flags_schema.has_findings
    assert flags_schema.flag_of_finding({"organ": "lung", "type": "nodule", "side": "left"}) == ["lung_nodule"]
    assert flags_schema.flag_of_finding({"organ": "liver", "type": "nodule"}) == []


def test_save_and_load_round_trip(tmp_path: Path, phantom_schema):
    path = phantom_schema.save(tmp_path)
    assert path.name == "label_schema.json" and load_schema(tmp_path) == phantom_schema


@pytest.mark.parametrize(("change", "match"), [
    ({"outputs": ["colour"]}, "outputs"),
    ({"colour": 1}, "unknown keys"),
    ({"finding_sites": {"head": [["nowhere", ["mass"]]], "chest": [], "abdomen": []}}, "not a structure"),
    ({"finding_sites": {"head": []}}, "one entry per region"),
    ({"phrases": {"hello": " hi"}}, "unknown phrase keys"),
    ({"regions": [{"name": "head"}, {"name": "head"}]}, "distinct"),
])
def test_inconsistent_schemas_are_refused(phantom_schema, change, match):
    data = {**phantom_schema.to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        LabelSchema(data)


def test_bad_schema_file_names_the_file(tmp_path: Path):
    bad = tmp_path / "schema.json"
    bad.write_text("{not json")
    with pytest.raises(RadFM3DInputError, match="schema.json"):
        load_schema(bad)
    bad.write_text(json.dumps({"outputs": ["flags"]}))
    with pytest.raises(RadFM3DInputError, match="flags"):
        load_schema(bad)
    with pytest.raises(RadFM3DInputError, match="not found"):
        load_schema(tmp_path / "missing.json")
