# Copyright (c) radfm3d contributors. Apache-2.0.
"""Harness on a small synthetic manifest built here (no phantom generator): oracle = 100%, constant = chance,
and a predictions-file round trip through the CLI writes JSON, Markdown and PNG."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from radfm3d.evaluation.harness import (
    cli,
    constant_predictions,
    evaluate_predictions,
    oracle_predictions,
    read_predictions,
    task_family,
    true_boxes_world_mm,
    write_predictions,
)

CLOSED = {
    "modality": ["CT.", "MRI."],
    "region": ["Head.", "Chest.", "Abdomen."],
    "vqa_presence": ["Yes.", "No."],
    "vqa_side": ["Left.", "Right."],
    "comparison": ["New.", "Grown.", "Shrunk.", "Resolved.", "Stable."],
}
FINDINGS = [("cyst", "left kidney"), ("nodule", "right lung"), ("hemorrhage", "left hemisphere"),
            ("calcification", "spleen"), ("cyst", "liver")]


def synthetic_records(n: int = 40, seed: int = 0, image: str | None = None) -> list[dict]:
    """n records per closed task plus report / open VQA / referring / grounding records."""
    rng = random.Random(seed)
    records = []
    images = [image] if image else []
    for task, choices in CLOSED.items():
        for i in range(n):
            records.append({"id": f"{task}-{seed}-{i}", "images": images, "task": task,
                            "prompt": f"<image> {task}?", "answer": rng.choice(choices), "choices": choices})
    for i in range(n // 2):
        pos = rng.sample(FINDINGS, rng.randint(0, 2))
        neg = [f for f in FINDINGS if f not in pos][:2]
        report = " ".join([f"{t.capitalize()} in the {o}." for t, o in pos] + [f"No {t} in the {o}." for t, o in neg])
        records.append({"id": f"report-{seed}-{i}", "images": images, "task": "report",
                        "prompt": "<image> Write the report.", "answer": report or "No abnormality."})
        t, o = rng.choice(FINDINGS)
        records.append({"id": f"loc-{seed}-{i}", "images": images, "task": "vqa_location",
                        "prompt": "<image> Where is the lesion?", "answer": f"A {t} in the {o}."})
        records.append({"id": f"ref-{seed}-{i}", "images": images, "task": "referring",
                        "prompt": "<image> What is in <box>1,2,3,4,5,6</box>?", "answer": f"A {t} in the {o}."})
        lo = np.array([rng.uniform(2, 10), rng.uniform(2, 10), rng.uniform(2, 6)])
        box = [*lo.tolist(), *(lo + [rng.uniform(2, 8), rng.uniform(2, 8), rng.uniform(1, 4)]).tolist()]
        records.append({"id": f"ground-{seed}-{i}", "images": images, "task": "grounding",
                        "prompt": f"<image> Locate the {t}.", "answer": "<box>10,20,30,40,50,60</box>",
                        "ground_truth": {"findings": [{"type": t, "box_world_mm": box}]}})
    return records


def test_task_families():
    assert task_family({"task": "vqa_presence", "choices": ["Yes.", "No."]}) == "vqa_closed:presence"
    assert task_family({"task": "vqa_location"}) == "vqa_open"
    assert task_family({"task": "vqa_size_bucket", "choices": ["<10 mm", ">=10 mm"]}) == "vqa_closed:size_bucket"
    assert task_family({"task": "report"}) == "report"
    assert task_family({"task": "grounding"}) == "grounding"
    assert task_family({"task": "comparison"}) == "comparison"
    assert true_boxes_world_mm({"ground_truth": {"target": {"box_world_mm": [0, 0, 0, 1, 1, 1]}}}) == [[0, 0, 0, 1, 1, 1]]


def test_oracle_scores_100_percent_and_blind_constant_is_near_chance():
    records = synthetic_records()
    oracle = oracle_predictions(records)  # world boxes attached for grounding
    blind = constant_predictions(records, train_records=synthetic_records(seed=1))
    res = evaluate_predictions(records, oracle, blind, embeddings=True, n_resamples=200)
    fams = res["families"]
    assert set(fams) >= {"modality", "region", "vqa_closed:presence", "vqa_closed:side", "comparison", "report",
                         "vqa_open", "referring", "grounding"}
    for name, fam in fams.items():
        figs = fam["figures"]
        assert figs, name
        for key, fig in figs.items():
            if key == "centre_error_mm":
                assert fig["value"] == pytest.approx(0.0), name
            else:
                assert fig["value"] == pytest.approx(1.0, abs=1e-4), (name, key)
        if fam["kind"] == "closed":
            assert fam["near_chance"]["model"]["accuracy"] is False
            assert fam["near_chance"]["blind"]["accuracy"] is True, (name, fam["blind"], fam["chance"])
    assert "embedding_similarity" in fams["report"]["figures"]
    assert any("presence [model]" in s and "above chance" in s for s in res["summary"])
    assert any("presence [blind]" in s and "NEAR CHANCE" in s for s in res["summary"])


def test_constant_answerer_near_chance():
    records = synthetic_records(n=60)
    const = constant_predictions(records, train_records=synthetic_records(n=60, seed=2))
    res = evaluate_predictions(records, const, embeddings=False, n_resamples=300,
                               train_records=synthetic_records(n=60, seed=2))
    for name, fam in res["families"].items():
        if fam["kind"] != "closed":
            continue
        acc = fam["figures"]["accuracy"]
        assert abs(acc["value"] - fam["chance"]["majority"]) < 1e-9  # constant = majority answer of training
        assert acc["value"] <= fam["chance"]["uniform"] + 0.25
        assert fam["near_chance"]["model"]["accuracy"] is True, name
    # a fixed text that names no finding gets finding recall 0 on reports with findings
    fixed = evaluate_predictions(records, constant_predictions(records, text="No abnormality."), embeddings=False,
                                 n_resamples=100)
    assert fixed["families"]["report"]["figures"]["finding_recall"]["value"] == 0.0


def test_likelihood_accuracy_and_missing_predictions():
    records = [r for r in synthetic_records(n=10) if r["task"] == "vqa_presence"]
    preds = {r["id"]: {"prediction": "", "choice_logliks": [0.0 if c == r["answer"] else -2.0 for c in r["choices"]]}
             for r in records[1:]}
    res = evaluate_predictions(records, preds, embeddings=False, n_resamples=100)
    figs = res["families"]["vqa_closed:presence"]["figures"]
    assert figs["accuracy"]["value"] == 0.0
    assert figs["accuracy_likelihood"]["value"] == 1.0 and figs["accuracy_likelihood"]["n"] == 9
    assert res["meta"]["missing_predictions"] == {"model": 1}


def _write_scan(path: Path) -> None:
    import nibabel as nib

    vol = np.zeros((16, 16, 8), np.float32)
    vol[4:10, 5:12, 2:6] = 100.0
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def test_predictions_file_round_trip_through_cli(tmp_path):
    _write_scan(tmp_path / "scan.nii.gz")
    records = synthetic_records(n=12, image="scan.nii.gz")
    with (tmp_path / "test.jsonl").open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    preds = write_predictions(oracle_predictions(records), tmp_path / "preds.jsonl")
    blind = write_predictions(constant_predictions(records), tmp_path / "blind.jsonl")
    assert read_predictions(preds)[records[0]["id"]]["prediction"] == records[0]["answer"]
    out = tmp_path / "out"
    rc = cli(["--manifest", str(tmp_path / "test.jsonl"), "--predictions", str(preds), "--blind-predictions",
              str(blind), "--out", str(out), "--no-embeddings", "--n-resamples", "100"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["families"]["vqa_closed:presence"]["figures"]["accuracy"]["value"] == 1.0
    assert results["families"]["grounding"]["figures"]["hit@0.5"]["value"] == 1.0
    md = (out / "report.md").read_text()
    assert "## vqa_closed:presence" in md and "| accuracy | 1.000 |" in md
    assert "near chance" in md and "above chance" in md
    png = (out / "task_bars.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "predictions.jsonl").is_file()
    try:
        import radfm3d.io  # noqa: F401
    except ImportError:
        return  # the slice figure needs the scan reader
    assert (out / "grounding_cases.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_predictions_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl.*prediction"):
        read_predictions(bad)


def test_grounding_from_box_text_through_the_codec():
    """`<box>` answers on the model grid are mapped to world mm through the recorded grid geometry."""
    from radfm3d.text.boxes import format_box, grid_box_to_normalised
    from radfm3d.transforms import GridGeometry

    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = [-30.0, -40.0, 10.0]
    geom = GridGeometry(affine, affine, (32, 32, 8), (32, 32, 8))
    grid_box = [8, 10, 2, 16, 20, 5]
    world_box = geom.box_grid_to_world(grid_box).tolist()
    answer = format_box([int(v) for v in np.round(grid_box_to_normalised(grid_box, (32, 32, 8)))])
    record = {"id": "g0", "task": "grounding", "prompt": "<image> Locate the cyst.", "answer": answer, "images": [],
              "ground_truth": {"target": {"box_world_mm": world_box}, "grid_geometry": geom.to_dict()}}
    far = {"id": "g1", **{k: v for k, v in record.items() if k != "id"},
           "ground_truth": {"target": {"box_world_mm": (np.asarray(world_box) + [40, 0, 0, 40, 0, 0]).tolist()},
                            "grid_geometry": geom.to_dict()}}
    res = evaluate_predictions([record, far], oracle_predictions([record, far], world_boxes=False),
                               embeddings=False, n_resamples=50)
    cases = {c["id"]: c for c in res["cases"]["grounding"]}
    assert cases["g0"]["iou"] > 0.7 and cases["g0"]["centre_error_mm"] < 4.0
    assert cases["g1"]["iou"] == 0.0 and cases["g1"]["centre_error_mm"] == pytest.approx(40.0, abs=4.0)


def test_vqa_with_choices_is_closed_even_for_size_questions():
    from radfm3d.evaluation.harness import task_family

    closed = {"task": "vqa_size", "choices": ["Smaller than 10 mm.", "10 to 20 mm."]}
    assert task_family(closed) == "vqa_closed:size"
    assert task_family({"task": "vqa_size"}) == "vqa_open"


def test_finding_f1_is_not_reported_when_references_name_no_findings():
    from radfm3d.evaluation.harness import evaluate_predictions

    records = [{"id": f"loc-{i}", "task": "open_location", "images": [], "prompt": "Where?",
                "answer": "In the left lung."} for i in range(4)]
    results = evaluate_predictions(records, {r["id"]: "In the left lung." for r in records}, embeddings=False,
                                   n_resamples=50)
    figures = results["families"]["open_location"]["figures"]
    assert "bleu4" in figures and "finding_f1" not in figures


# ------------------------------------------------------------------------------------ evaluate --model in batches
def _batch_manifest(folder: Path) -> Path:
    """5 good records on one scan, plus one whose image is missing, one whose image is corrupt and one whose prompt
    names two images for its one."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_scan(folder / "scan.nii.gz")
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 not gzip")
    records = [{"id": f"m{i}", "task": "modality", "images": ["scan.nii.gz"], "prompt": "<image> CT or MRI?",
                "answer": "CT.", "choices": ["CT.", "MRI."]} for i in range(5)]
    records.insert(1, {"id": "missing", "task": "modality", "images": ["gone.nii.gz"], "prompt": "<image> CT?",
                       "answer": "CT."})
    records.insert(4, {"id": "corrupt", "task": "modality", "images": ["corrupt.nii.gz"],
                       "prompt": "<image> CT?", "answer": "CT."})
    records.append({"id": "two-images", "task": "modality", "images": ["scan.nii.gz"],
                    "prompt": "<image> <image> Compare.", "answer": "CT."})
    manifest = folder / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


@pytest.fixture
def generated_ids(monkeypatch) -> list[int]:
    """The batch sizes of every model.generate call (the real generate still runs)."""
    from radfm3d.modeling.model import RadFM3DForCausalLM

    calls: list[int] = []
    real = RadFM3DForCausalLM.generate

    def counting(self, *args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RadFM3DForCausalLM, "generate", counting)
    return calls


def test_evaluate_model_writes_as_it_goes_reports_bad_records_and_resumes(tiny_model_dir, tmp_path, generated_ids,
                                                                           capsys):
    manifest, out = _batch_manifest(tmp_path / "data"), tmp_path / "eval"
    args = ["--manifest", str(manifest), "--model", str(tiny_model_dir), "--out", str(out), "--no-blind",
            "--no-embeddings", "--n-resamples", "20", "--max-new-tokens", "2", "--batch-size", "2"]
    assert cli(args) == 1  # some records failed: non-zero, after everything else was written
    good = [f"m{i}" for i in range(5)]
    preds = read_predictions(out / "predictions.jsonl")
    assert sorted(preds) == good
    assert sum(generated_ids) == 5  # each good record generated once, the bad ones never reached the model
    failures = json.loads((out / "failures.json").read_text())
    assert sorted(f["id"] for f in failures) == ["corrupt", "missing", "two-images"]
    assert "line 8" in next(f["problem"] for f in failures if f["id"] == "two-images")
    assert "gone.nii.gz" in next(f["problem"] for f in failures if f["id"] == "missing")
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["n_records"] == 5 and results["meta"]["failed_records"] == 3
    assert "## Failed records (3, not scored)" in (out / "report.md").read_text()
    assert "3 of 8 record(s) could not be used" in capsys.readouterr().out

    # rerun: nothing is generated again
    generated_ids.clear()
    assert cli(args) == 1
    assert generated_ids == [] and read_predictions(out / "predictions.jsonl") == preds

    # a run killed while writing: the last record and a torn line are lost; the rerun generates that record only
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:-1]) + lines[-1][:15])
    assert cli(args) == 1
    assert sum(generated_ids) == 1
    assert read_predictions(out / "predictions.jsonl") == preds

    # the same folder with other generation settings is refused, not mixed
    with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
        cli([*args[:-4], "--max-new-tokens", "3", "--batch-size", "2"])
    # and so are predictions that a scoring run (--oracle) wrote there
    assert cli([*args[:2], "--oracle", *args[4:]]) == 1
    assert not (out / "run.json").exists()
    with pytest.raises(ValueError, match="predictions.jsonl.*no --model run"):
        cli(args)


def test_unusable_out_is_refused_before_any_work(tmp_path):
    """An --out that is a file (or cannot be written) fails first: the model and manifest are not even read."""
    import os

    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    missing_model, missing_manifest = tmp_path / "no-model", tmp_path / "no-manifest.jsonl"
    with pytest.raises(ValueError, match="results.txt.*existing file"):
        cli(["--manifest", str(missing_manifest), "--model", str(missing_model), "--out", str(existing)])
    assert existing.read_text() == "keep me"
    if os.geteuid() == 0:
        return  # root writes anywhere: the permission case cannot be staged
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="locked.*cannot be written"):
            cli(["--manifest", str(missing_manifest), "--model", str(missing_model), "--out", str(locked / "x")])
    finally:
        locked.chmod(0o700)


def test_a_grounding_record_with_an_unreadable_scan_is_a_noted_miss(tmp_path):
    """Scoring <box> text needs the record's scan; a corrupt one costs that case (noted), not the evaluation or the
    figure of the other cases."""
    from radfm3d.evaluation.report import write_report

    _write_scan(tmp_path / "scan.nii.gz")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 not gzip")
    records = [r for r in synthetic_records(n=8, image=str(tmp_path / "scan.nii.gz")) if r["task"] == "grounding"]
    records[0] = {**records[0], "images": [str(tmp_path / "corrupt.nii.gz")]}
    res = evaluate_predictions(records, oracle_predictions(records, world_boxes=False), embeddings=False,
                               n_resamples=20)
    cases = {c["id"]: c for c in res["cases"]["grounding"]}
    assert cases[records[0]["id"]]["pred_boxes_world_mm"] == [] and cases[records[0]["id"]]["iou"] == 0.0
    assert all(len(cases[r["id"]]["pred_boxes_world_mm"]) == 1 for r in records[1:])  # placed on their scan
    assert any("corrupt.nii.gz" in n and "scored as no box" in n for n in res["families"]["grounding"]["notes"])
    paths = write_report(res, tmp_path / "out", records=records)
    assert paths["grounding_cases"].read_bytes()[:4] == b"\x89PNG"


def test_evaluate_model_api_runs_the_blind_baseline_on_the_good_records_only(tiny_model_dir, tmp_path,
                                                                              generated_ids):
    from radfm3d.evaluation.harness import evaluate_model
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    manifest, out = _batch_manifest(tmp_path / "data"), tmp_path / "eval"
    model, processor = RadFM3DForCausalLM.from_pretrained(tiny_model_dir), RadFM3DProcessor.from_pretrained(
        tiny_model_dir)
    res = evaluate_model(model, processor, manifest, batch_size=3, max_new_tokens=2, likelihood=False,
                         progress=False, embeddings=False, out_dir=out)
    assert sum(generated_ids) == 10  # 5 good records, model and blind
    assert sorted(read_predictions(out / "blind_predictions.jsonl")) == [f"m{i}" for i in range(5)]
    assert sorted({f["id"] for f in res["failures"]}) == ["corrupt", "missing", "two-images"]
    assert res["meta"]["runs"] == ["blind", "model"] and res["meta"]["missing_predictions"] == {"model": 0,
                                                                                                "blind": 0}


def test_report_finding_f1_speaks_the_label_schema(tmp_path):
    """A schema's flags join the report finding-F1 vocabulary: reports in a CT-RATE-like vocabulary are scored
    (and not without the schema); evaluate finds a model's label_schema.json by itself."""
    schema = {"format": "radfm3d-label-schema", "version": 1, "name": "ct-rate-like", "outputs": ["flags"],
              "flags": [{"name": "bronchiectasis", "phrase": " bronchiectasis"},
                        {"name": "mosaic attenuation pattern", "phrase": " mosaic attenuation pattern"}]}
    records = [{"id": f"r{i}", "task": "report", "images": [], "prompt": "Report.",
                "answer": "There is bronchiectasis. No mosaic attenuation pattern."} for i in range(4)]
    preds = {"r0": "There is bronchiectasis.", "r1": "Bronchiectasis.", "r2": "Normal study.", "r3": "Normal."}
    plain = evaluate_predictions(records, preds, n_resamples=20, embeddings=False)
    assert "finding_f1" not in plain["families"]["report"]["figures"]
    scored = evaluate_predictions(records, preds, n_resamples=20, embeddings=False, label_schema=schema)
    assert scored["families"]["report"]["figures"]["finding_recall"]["value"] == pytest.approx(0.5)
    assert "ct-rate-like" in scored["meta"]["finding_vocabulary"]
    path = tmp_path / "label_schema.json"
    path.write_text(json.dumps(schema))
    from_file = evaluate_predictions(records, preds, n_resamples=20, embeddings=False, label_schema=path)
    assert from_file["families"]["report"]["figures"] == scored["families"]["report"]["figures"]


def test_answer_nll_is_the_training_loss_of_the_reference_and_shares_the_choices_pass(tiny_model_dir, tmp_path):
    """``answer_nll`` = the teacher-forced loss the model trains on (mean NLL per answer token); for a closed record
    it comes from the choices' own forward pass, and a blank image changes it."""
    import torch

    from radfm3d.data.image_meta import record_images
    from radfm3d.evaluation.harness import _likelihood_entries
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    _write_scan(tmp_path / "scan.nii.gz")
    model = RadFM3DForCausalLM.from_pretrained(tiny_model_dir).eval()
    processor = RadFM3DProcessor.from_pretrained(tiny_model_dir)
    closed = {"id": "c", "task": "modality", "images": [str(tmp_path / "scan.nii.gz")], "prompt": "<image> CT or MRI?",
              "answer": "MRI.", "choices": ["CT.", "MRI."]}
    report = {"id": "r", "task": "report", "images": closed["images"], "prompt": "<image> Write the report.",
              "answer": "A cyst in the left kidney. No nodule."}
    for record in (closed, report):
        entry = _likelihood_entries(model, processor, record, blank_images=False)
        ex = processor.build_training_example(record["prompt"], record["answer"], record_images(record))
        batch = {k: torch.as_tensor(v)[None] for k, v in ex.items()  # one-record batch
                 if k in ("input_ids", "labels", "pixel_values", "image_mask")}
        with torch.no_grad():
            loss = float(model(**batch).loss)
        assert entry["answer_nll"] == pytest.approx(loss, rel=1e-4)
        blank = _likelihood_entries(model, processor, record, blank_images=True)
        assert blank["answer_nll"] != pytest.approx(entry["answer_nll"], rel=1e-6)
    closed_entry = _likelihood_entries(model, processor, closed, blank_images=False)
    assert len(closed_entry["choice_logliks"]) == 2
    assert "choice_logliks" not in _likelihood_entries(model, processor, report, blank_images=False)
    assert _likelihood_entries(model, processor, {**report, "answer": ""}, blank_images=False) == {}


def test_image_gain_is_the_paired_mean_of_blind_minus_model_nll(tmp_path):
    from radfm3d.evaluation.report import write_report

    records = [{"id": f"r{i}", "task": "report", "images": [], "prompt": "Report.",
                "answer": "A cyst in the liver."} for i in range(6)]
    model_nll = [0.5, 0.7, 0.9, 1.1, 0.6, None]  # the last record has no model NLL: not paired
    blind_nll = [0.9, 0.8, 1.2, 1.1, 1.0, 2.0]
    preds = {r["id"]: {"prediction": "A cyst.", "answer_nll": v} for r, v in zip(records, model_nll)}
    blind = {r["id"]: {"prediction": "Normal.", "answer_nll": v} for r, v in zip(records, blind_nll)}
    res = evaluate_predictions(records, preds, blind, embeddings=False, n_resamples=200)
    fam = res["families"]["report"]
    assert fam["figures"]["answer_nll"]["value"] == pytest.approx(np.mean(model_nll[:5]))
    assert fam["figures"]["answer_nll"]["n"] == 5 and fam["blind"]["answer_nll"]["n"] == 6
    assert fam["image_gain"]["value"] == pytest.approx(np.mean([0.4, 0.1, 0.3, 0.0, 0.4]))
    assert fam["image_gain"]["n"] == 5 and 0.0 <= fam["image_gain"]["low"] <= fam["image_gain"]["high"] <= 0.4
    assert res["cases"]["report"][0]["blind_answer_nll"] == 0.9
    report = write_report(res, tmp_path / "out", records=records)["markdown"].read_text()
    assert "Image gain" in report and "0.240" in report
    assert any(line.startswith("report: image gain +0.240") and "the image helps" in line for line in res["summary"])
    # without a blind run, or without NLLs, there is no gain (and no answer_nll figure without NLLs)
    assert "image_gain" not in evaluate_predictions(records, preds, embeddings=False,
                                                    n_resamples=20)["families"]["report"]
    plain = evaluate_predictions(records, {r["id"]: "A cyst." for r in records}, embeddings=False, n_resamples=20)
    assert "answer_nll" not in plain["families"]["report"]["figures"]


def test_add_answer_nll_fills_a_predictions_file_in_place(tiny_model_dir, tmp_path):
    """Predictions made elsewhere (the bundles' evaluators) get ``answer_nll``; entries that have one are kept."""
    from radfm3d.evaluation.harness import add_answer_nll
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    manifest = _batch_manifest(tmp_path / "data")
    good = [json.loads(line) for line in manifest.read_text().splitlines()
            if json.loads(line)["id"] in ("m0", "m1", "m2")]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in good))
    preds_file = write_predictions({"m0": "CT.", "m1": {"prediction": "MRI.", "answer_nll": 9.0}, "m2": "CT."},
                                   tmp_path / "predictions.jsonl")
    model = RadFM3DForCausalLM.from_pretrained(tiny_model_dir)
    processor = RadFM3DProcessor.from_pretrained(tiny_model_dir)
    add_answer_nll(model, processor, manifest, preds_file, progress=False)
    preds = read_predictions(preds_file)
    assert preds["m1"]["answer_nll"] == 9.0 and preds["m1"]["prediction"] == "MRI."
    assert preds["m0"]["answer_nll"] > 0
    assert preds["m0"]["answer_nll"] == pytest.approx(preds["m2"]["answer_nll"])  # same record content
    assert len(preds["m0"]["choice_logliks"]) == 2
