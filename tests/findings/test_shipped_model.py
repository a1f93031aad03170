# Copyright (c) radfm3d contributors. Apache-2.0.
"""The shipped demo model under the findings room: its older config migrates (in memory and on disk) to the same
reading, and its answers on held-out phantom test records are those recorded before the findings room
(``data/shipped_answers.json``, written by ``python -m tests.findings.shipped_reference``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from radfm3d.text.boxes import parse_boxes

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parents[1] / "bundles" / "radfm3d_demo" / "models" / "model"
LEGACY_CONFIG = HERE / "data" / "legacy_config.json"
REFERENCE = HERE / "data" / "shipped_answers.json"
#: records of case 21 of the seed-0 test split (an MRI abdomen with a splenic cyst and calcification): a finding box
#: (snapped), an organ box, a short answer (the 100-record check is run by hand: shipped_reference.py)
RECORDS = ("case-000021-grounding-0", "case-000021-grounding-2", "case-000021-modality-0")


def _legacy_spec() -> dict:
    return json.loads(LEGACY_CONFIG.read_text())["findings_prompt"]


def test_shipped_folder_names_its_schema_and_no_token_ids(phantom_schema):
    config = json.loads((SHIPPED / "config.json").read_text())
    assert "findings_prompt" not in config and "token_ids" not in json.dumps(config)
    assert config["auto_map"]["AutoModelForCausalLM"] == "radfm3d.findings.model.RadFM3DFindingsModel"
    from radfm3d.findings.schema import load_schema

    assert load_schema(SHIPPED / config["label_schema"]) == phantom_schema


def test_legacy_config_migrates_to_the_same_phrases_and_token_ids(phantom_schema):
    from radfm3d.findings.model import legacy_schema, migrate_config
    from radfm3d.findings.reader import FindingsReader
    from radfm3d.findings.schema import load_schema
    from radfm3d.processing import RadFM3DProcessor

    spec = _legacy_spec()
    derived = load_schema(legacy_schema(spec))
    for name in ("modalities", "regions", "structures", "finding_types", "finding_sites"):
        assert getattr(derived, name) == getattr(phantom_schema, name), name
    assert {k: v for k, v in derived.phrases.items()} == phantom_schema.phrases
    migrated = migrate_config(json.loads(LEGACY_CONFIG.read_text()))
    assert migrated["reader"] == {"num_tokens": 28, "threshold": 0.4, "head_hidden": 512,
                                  "test_time_shifts": [[2, 2, 0], [-2, -2, 0]], "snap_boxes": True}
    reader = FindingsReader(phantom_schema, migrated["reader"], 192, 32)
    reader.tokenize(RadFM3DProcessor.from_pretrained(SHIPPED).tokenizer)
    names = {"modality": phantom_schema.modalities, "region": phantom_schema.regions,
             "structure": phantom_schema.structures, "type": phantom_schema.finding_types}
    for key, ids in spec["token_ids"].items():
        kind, _, index = key.partition(":")
        assert reader.phrase_ids[f"{kind}:{names[kind][int(index)]}" if index else key] == ids, key
    with pytest.raises(ValueError, match="patch map"):
        migrate_config({"findings_prompt": {**spec, "site_scores": "patch_map"}})


def test_legacy_folder_loads_in_memory_and_migrates_on_disk(tmp_path: Path):
    """A copy of the shipped folder with the older config (weights under ``findings_prompter.*``, a patch head the
    reader no longer has) loads as a findings model; ``radfm3d findings-migrate`` rewrites it to the shipped config."""
    import torch

    from radfm3d.cli import main
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.findings.model import RadFM3DFindingsModel
    from radfm3d.modeling.model import RadFM3DForCausalLM

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for item in SHIPPED.iterdir():
        if item.name not in ("config.json", "label_schema.json"):
            (legacy / item.name).symlink_to(item)
    shutil.copy(LEGACY_CONFIG, legacy / "config.json")
    with pytest.raises(RadFM3DInputError, match="findings-migrate"):
        RadFM3DForCausalLM.from_pretrained(legacy, load_text_weights=False)
    old = RadFM3DFindingsModel.from_pretrained(legacy, load_text_weights=False)
    new = RadFM3DForCausalLM.from_pretrained(SHIPPED, load_text_weights=False)
    assert torch.equal(old.reader.head.net[-1].weight, new.reader.head.net[-1].weight)
    assert main(["findings-migrate", str(legacy)]) == 0
    assert json.loads((legacy / "config.json").read_text()) == json.loads((SHIPPED / "config.json").read_text())
    assert isinstance(RadFM3DForCausalLM.from_pretrained(legacy, load_text_weights=False), RadFM3DFindingsModel)


@pytest.fixture(scope="module")
def test_records(tmp_path_factory) -> list[dict]:
    from shipped_reference import phantom_test_records

    folder = tmp_path_factory.mktemp("shipped") / "phantoms"
    records = phantom_test_records(folder, 10_000, n_cases=22)
    by_id = {r["id"]: r for r in records}
    return [by_id[i] for i in RECORDS]


def test_shipped_answers_are_the_recorded_ones(test_records):
    from shipped_reference import answers, load_shipped

    reference = json.loads(REFERENCE.read_text())
    model, processor = load_shipped()
    got = answers(model, processor, test_records)
    for rid in RECORDS:
        if rid.split("-")[2] == "grounding":  # snapping rewrites the box text: the boxes must be the same
            assert parse_boxes(got[rid]["text"]) == parse_boxes(reference[rid]["text"]), rid
        else:
            assert got[rid]["ids"] == reference[rid]["ids"], rid
    reading = model.read_findings(processor(text=["<image>"], images=[test_records[0]["images"]],
                                            return_tensors="pt")["pixel_values"])[0][0]
    assert reading["region"] == "abdomen" and reading["text"].startswith("Image reading: MRI T1-weighted, abdomen;")


def test_loading_the_shipped_model_prints_no_misleading_warning():
    import logging

    from radfm3d.engine.training import load_processor, load_trained_model

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        load_processor(SHIPPED)
        load_trained_model(SHIPPED)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "model of type" in m]
