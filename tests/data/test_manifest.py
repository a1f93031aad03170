# Copyright (c) radfm3d contributors. Apache-2.0.
"""Manifest JSONL: round trip, atomic writes and validator errors with line numbers."""

from __future__ import annotations

import json

import pytest

from radfm3d.data.manifest import (
    cli,
    parse_task_counts,
    read_manifest,
    resolve_images,
    sample_by_task,
    scale_task_mix,
    validate_manifest,
    validate_record,
    write_manifest,
)
from radfm3d.errors import RadFM3DInputError

GOOD = {"id": "case-1", "images": ["scans/a.nii.gz"], "modality": "CT", "region": "chest", "task": "vqa_presence",
        "prompt": "<image> Is there a nodule in the left lung?", "answer": "Yes.", "choices": ["Yes.", "No."],
        "ground_truth": {"findings": [{"type": "nodule", "box_world_mm": [0, 0, 0, 1, 1, 1]}]}}


def test_round_trip_and_atomic(tmp_path):
    recs = [GOOD, {**GOOD, "id": "case-2", "images": ["a.nii.gz", "b.nii.gz"], "prompt": "<image> <image> Compare.",
                   "choices": None}]
    recs[1].pop("choices")
    path = write_manifest(recs, tmp_path / "sub" / "train.jsonl")
    assert read_manifest(path) == recs
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["train.jsonl"]  # no temp file left
    assert resolve_images(recs[1], path)[1] == tmp_path / "sub" / "b.nii.gz"


def test_invalid_records_are_not_written(tmp_path):
    with pytest.raises(RadFM3DInputError, match="line 1: 'prompt' has 0 <image> placeholder"):
        write_manifest([{**GOOD, "prompt": "no image here"}], tmp_path / "m.jsonl")
    assert not list(tmp_path.iterdir())


def test_validator_reports_line_numbers(tmp_path):
    lines = [
        json.dumps(GOOD),
        "",  # blank lines are skipped but counted
        json.dumps({k: v for k, v in GOOD.items() if k != "id"}),
        "{not json",
        json.dumps({**GOOD, "answer": "Maybe."}),
        json.dumps(GOOD),
        json.dumps({**GOOD, "id": "x", "images": "a.nii.gz"}),
        json.dumps([1, 2]),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    problems = validate_manifest(path, raise_on_error=False)
    text = "\n".join(problems)
    assert "line 3: missing required key(s) id" in text
    assert "line 4: invalid JSON" in text
    assert "line 5: 'answer' 'Maybe.' is not one of 'choices'" in text
    assert "line 6: duplicate id 'case-1' (first on line 1)" in text
    assert "line 7: 'images' must be a list" in text
    assert "line 8: a record must be a JSON object" in text
    assert not any(p.startswith("line 1:") for p in problems)
    with pytest.raises(RadFM3DInputError) as err:
        read_manifest(path)
    assert str(path) in str(err.value) and "line 4: invalid JSON" in str(err.value)


def test_check_files_and_missing_manifest(tmp_path):
    assert validate_record(GOOD) == []
    probs = validate_record(GOOD, base_dir=tmp_path, check_files=True)
    assert probs and "does not exist" in probs[0]
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.nii.gz").write_bytes(b"x")
    assert validate_record(GOOD, base_dir=tmp_path, check_files=True) == []
    with pytest.raises(RadFM3DInputError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")


def test_streaming_writer_is_atomic(tmp_path):
    from radfm3d.data.manifest import ManifestWriter

    path = tmp_path / "m.jsonl"
    with ManifestWriter(path) as w:
        w.write(GOOD)
        w.write({**GOOD, "id": "case-2"})
    assert [r["id"] for r in read_manifest(path)] == ["case-1", "case-2"]
    with pytest.raises(RadFM3DInputError, match="record 2: duplicate id 'case-1'"):
        with ManifestWriter(path) as w:
            w.write(GOOD)
            w.write(GOOD)
    assert [r["id"] for r in read_manifest(path)] == ["case-1", "case-2"]  # old file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def _task_records(n_per_task: dict[str, int]) -> list[dict]:
    return [{"id": f"{task}-{i}", "images": [f"img/{task}-{i}.nii.gz"], "prompt": "<image> q", "answer": "a",
             "task": task} for task, n in n_per_task.items() for i in range(n)]


def test_sample_by_task_caps_and_is_deterministic():
    records = _task_records({"report": 10, "grounding": 4, "modality": 6})
    mix = sample_by_task(records, {"report": 3, "grounding": 9}, seed=1)
    assert sorted(r["task"] for r in mix) == ["grounding"] * 4 + ["report"] * 3  # capped; modality dropped
    assert [r["id"] for r in mix] == [r["id"] for r in sample_by_task(records, {"report": 3, "grounding": 9}, seed=1)]


@pytest.mark.parametrize("text, expected", [("report=3", {"report": 3}), (" a=1 , b=0,", {"a": 1, "b": 0})])
def test_parse_task_counts(text, expected):
    assert parse_task_counts(text) == expected


@pytest.mark.parametrize("text", ["", "report", "report=-1", "report=x", "=3", "report=1,report=2"])
def test_parse_task_counts_rejects(text):
    with pytest.raises(ValueError):
        parse_task_counts(text)


def test_scale_task_mix():
    counts = scale_task_mix({"report": 150, "grounding": 190, "modality": 60}, 4000)
    assert counts == {"report": 1500, "grounding": 1900, "modality": 600}
    assert sum(scale_task_mix({"a": 1, "b": 2}, 10).values()) >= 10


def test_sample_tasks_cli_rebases_image_paths(tmp_path, capsys):
    src = tmp_path / "data" / "train.jsonl"
    src.parent.mkdir()
    write_manifest(_task_records({"report": 10, "grounding": 10}), src)
    out = tmp_path / "mixes" / "mix.jsonl"
    assert cli([str(src), "--counts", "report=1,grounding=3", "--total", "8", "--seed", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 8 and summary["per_task"] == {"grounding": 6, "report": 2}
    mix = read_manifest(out)
    assert len(mix) == 8
    # image paths were relative to data/: they now point there from mixes/
    assert all(resolve_images(r, out)[0].parent == (src.parent / "img").resolve() for r in mix)


def test_sample_tasks_cli_errors(tmp_path, capsys):
    assert cli([str(tmp_path / "missing.jsonl"), "--counts", "report=1", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli([str(tmp_path / "missing.jsonl"), "--counts", "report", "--out", str(tmp_path / "o.jsonl")])


# ------------------------------------------------------------------------------------------------ hostile files
def test_non_utf8_manifest_names_the_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(GOOD, ensure_ascii=False)
    bad = json.dumps({**GOOD, "id": "case-2", "answer": "Yes.", "region": "thorax"}, ensure_ascii=False)
    path.write_bytes(good.encode() + b"\n" + bad.replace("thorax", "th\xe9rax").encode("latin-1") + b"\n")
    problems = validate_manifest(path, raise_on_error=False)
    assert len(problems) == 1 and problems[0].startswith("line 2: not UTF-8 text (byte 0xe9 at column ")
    with pytest.raises(RadFM3DInputError, match=r"(?s)latin1.jsonl: .*line 2: not UTF-8 text"):
        read_manifest(path)
    with pytest.raises(RadFM3DInputError, match=r"latin1.jsonl: line 2: not UTF-8 text \(byte 0xe9"):
        read_manifest(path, validate=False)


def test_deeply_nested_json_is_a_clear_error_not_a_recursion_crash(tmp_path):
    path = tmp_path / "deep.jsonl"
    deep = {**GOOD, "id": "deep", "ground_truth": {"x": 0}}
    line = json.dumps(deep).replace('{"x": 0}', '{"x": ' + "[" * 200000 + "]" * 200000 + "}")
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    problems = validate_manifest(path, raise_on_error=False)
    assert problems == ["line 2: JSON nested too deeply to read (hundreds of levels of [ or {)"]
    with pytest.raises(RadFM3DInputError, match="line 2: JSON nested too deeply"):
        read_manifest(path)


def test_read_jsonl_is_the_one_line_numbered_reader(tmp_path):
    from radfm3d.data.manifest import iter_jsonl, read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n')  # a UTF-8 byte-order mark is accepted
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert [n for n, _ in iter_jsonl(path)] == [1, 3]
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(RadFM3DInputError, match="line 2: expected a JSON object, found list"):
        read_jsonl(path)
    assert read_jsonl(path, objects_only=False) == [{"a": 1}, [1, 2]]
    # a killed appender leaves half a last line: an error by default, skipped when asked
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    with pytest.raises(RadFM3DInputError, match="line 3: invalid JSON"):
        read_jsonl(path)
    assert read_jsonl(path, allow_partial_last_line=True) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}')  # a broken line in the middle is never skipped
    with pytest.raises(RadFM3DInputError, match="line 2: invalid JSON"):
        read_jsonl(path, allow_partial_last_line=True)
    with pytest.raises(RadFM3DInputError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(RadFM3DInputError, match="not a file"):
        read_jsonl(tmp_path)


def test_lone_surrogates_and_unwritable_records_are_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "case-2"}).replace("Is there", "\\ud800Is")
                    + "\n")  # valid JSON whose string decodes to a lone surrogate
    with pytest.raises(RadFM3DInputError, match=r"line 2: 'prompt' holds a lone surrogate '\\ud800' at character 8"):
        read_manifest(path)
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(RadFM3DInputError, match="record 2 cannot be written as a JSON line \\(nested too deeply\\)"):
        write_manifest([GOOD, {**GOOD, "id": "case-2", "ground_truth": deep}], tmp_path / "out.jsonl")
    with pytest.raises(RadFM3DInputError, match="record 1 cannot be written"):
        write_manifest([{**GOOD, "ground_truth": {"x": object()}}], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


# ------------------------------------------------------------------------------------- study / patient / structures
STUDY = {"id": "s1-study_report", "images": ["ct.nii.gz", "t1.nii.gz"], "prompt": "<image> <image> Report.",
         "answer": "FINDINGS: The left kidney is unremarkable.", "task": "study_report", "study_id": "s1",
         "patient_id": "p1", "image_modalities": ["CT", "MR T1"],
         "report_structures": [{"text": "The left kidney is unremarkable.", "structure": "kidney/left",
                                "box_world_mm": [10, -40, -60, 40, -10, 0]},
                               {"text": "No liver lesion.", "structure": "liver", "mask": "masks/liver.nii.gz",
                                "mask_label": 1},
                               {"text": "Heart size is normal.", "structure": "heart"}],
         "labels": {"kidney cyst": 0, "liver mass": 1}}


def test_study_keys_are_valid():
    assert validate_record(STUDY) == []
    assert validate_manifest([STUDY, {**STUDY, "id": "s1-other", "study_id": "s1"}], raise_on_error=False) == []


@pytest.mark.parametrize("change, message", [
    ({"study_id": ""}, "'study_id' must be a non-empty string, got ''"),
    ({"patient_id": 7}, "'patient_id' must be a non-empty string, got 7"),
    ({"image_modalities": ["CT"]}, "'image_modalities' has 1 entries but 'images' lists 2 image(s)"),
    ({"image_modalities": "CT"}, "'image_modalities' must be a list of non-empty strings"),
    ({"report_structures": {"text": "x"}}, "'report_structures' must be a list of objects, got dict"),
    ({"report_structures": ["The liver."]}, "'report_structures'[0] must be an object, got str"),
    ({"report_structures": [{"text": "The liver."}]}, "'report_structures'[0] is missing 'structure'"),
    ({"report_structures": [{"text": " ", "structure": "liver"}]}, "'report_structures'[0].text must be a non-empty"),
    ({"report_structures": [{"text": "a", "structure": "liver", "box_world_mm": [0, 0, 0, 1, 1]}]},
     "'report_structures'[0].box_world_mm must be 6 finite numbers"),
    ({"report_structures": [{"text": "a", "structure": "liver", "box_world_mm": [0, 0, 0, 1, float("nan"), 1]}]},
     "'report_structures'[0].box_world_mm must be 6 finite numbers"),
    ({"report_structures": [{"text": "a", "structure": "liver", "box_world_mm": [5, 0, 0, 1, 1, 1]}]},
     "'report_structures'[0].box_world_mm must have x1 <= x2"),
    ({"report_structures": [{"text": "a", "structure": "liver", "mask_label": 1}]},
     "'report_structures'[0] has 'mask_label' without 'mask'"),
    ({"report_structures": [{"text": "a", "structure": "liver", "mask": "m.nii.gz", "mask_label": True}]},
     "'report_structures'[0].mask_label must be an integer >= 0, got True"),
    ({"report_structures": [{"text": "a", "structure": "liver", "box": [0, 0, 0, 1, 1, 1]}]},
     "'report_structures'[0] has unknown key(s) 'box'"),
    ({"labels": ["cyst"]}, "'labels' must be a JSON object of class name -> 0 or 1, got list"),
    ({"labels": {"cyst": 2}}, "'labels'['cyst'] must be 0 or 1, got 2"),
    ({"labels": {"cyst": True}}, "'labels'['cyst'] must be 0 or 1, got True"),
])
def test_bad_study_keys_are_named(tmp_path, change, message):
    assert any(message in p for p in validate_record({**STUDY, **change})), validate_record({**STUDY, **change})
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(STUDY) + "\n" + json.dumps({**STUDY, "id": "bad", **change}) + "\n")
    with pytest.raises(RadFM3DInputError) as err:
        read_manifest(path)
    assert str(path) in str(err.value) and f"line 2: {message}" in str(err.value)


def test_one_study_has_one_patient_and_masks_are_checked_with_files(tmp_path):
    problems = validate_manifest([STUDY, {**STUDY, "id": "x"}, {**STUDY, "id": "y", "patient_id": "p2"}],
                                 raise_on_error=False)
    assert problems == ["line 3: study_id 's1' has patient_id 'p2' here but 'p1' on line 1 (one study belongs to one "
                        "patient)"]
    for name in ("ct.nii.gz", "t1.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    problems = validate_record(STUDY, base_dir=tmp_path, check_files=True)
    assert len(problems) == 1 and problems[0].startswith("'report_structures'[1].mask 'masks/liver.nii.gz' does not")


def test_check_patient_splits_names_the_shared_patients(tmp_path):
    from radfm3d.data.manifest import check_patient_splits

    train = [STUDY, {**STUDY, "id": "b", "study_id": "s2", "patient_id": "p2"}]
    test = [{**STUDY, "id": "c", "study_id": "s3", "patient_id": "p3"}]
    assert check_patient_splits({"train": train, "test": test}) == []
    write_manifest(train, tmp_path / "train.jsonl")
    write_manifest(test + [{**STUDY, "id": "d", "study_id": "s4", "patient_id": "p2"}], tmp_path / "test.jsonl")
    problems = check_patient_splits({"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"},
                                    raise_on_error=False)
    assert problems == ["patient_id 'p2' is in train (train.jsonl line 2) and test (test.jsonl line 2)"]
    with pytest.raises(RadFM3DInputError, match="one patient or study in two splits"):
        check_patient_splits({"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"})


def test_importer_reports_patients_in_two_splits(tmp_path):
    from radfm3d.data.importers.common import ImportReport, write_split_manifests

    report = ImportReport("test", tmp_path)
    records = [("train", STUDY), ("test", {**STUDY, "id": "b", "study_id": "s2"}),
               ("test", {**STUDY, "id": "c", "study_id": "s3", "patient_id": "p3"})]
    paths = write_split_manifests(records, tmp_path, report)
    assert sorted(paths) == ["test", "train"]
    assert report.extra["patients_in_several_splits"] == {"p1": ["test", "train"]}
    assert "1 patient(s) have records in several splits" in report.notes[0]["message"]
