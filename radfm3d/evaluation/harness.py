# Copyright (c) radfm3d contributors. Apache-2.0.
"""Evaluation harness: score predictions (from a radfm3d model or a plain JSONL file) on a task manifest.

Predictions are `id -> text` or `id -> {"prediction": text, "choice_logliks": [float per choice] | None,
"answer_nll": float | None, "grid_geometry": GridGeometry dict | None, "boxes_world_mm": [[x1,y1,z1,x2,y2,z2], ...]
| None}` (``answer_nll``: the reference answer's teacher-forced negative log-likelihood, nats per answer token).
A predictions file is JSONL with one such object per line plus its `"id"`.

Task families and their figures:

- closed (`modality`, `region`, `vqa_closed:<sub>`, `comparison`): accuracy by normalised match / offered
  choice; accuracy by likelihood over choices where log-likelihoods are given; chance levels (uniform over
  choices, majority answer) and whether the run is near chance;
- text (`report`, `vqa_open`, `referring`, `rationale`): BLEU-4, ROUGE-L, embedding similarity,
  negation-aware finding precision/recall/F1;
- `grounding`: 3D IoU, hit@0.3/0.5, box parse rate, centre error in mm (world space of the original scan).

Every family with ``answer_nll`` gets that figure too. Every figure carries a bootstrap 95% interval, and the blind
baseline (same prompts, blank image) is scored beside the model when given; with the NLL of both runs a family also
gets its **image gain** (blind NLL - model NLL, paired): the most sensitive check that the model reads the image,
since it moves before the generated answers do.

Running a model (:func:`run_model`, the one generation path of `radfm3d evaluate --model` and :func:`evaluate_model`)
appends each prediction to a JSONL file as it is made, so a rerun on the same output folder skips the records
already predicted; a record whose images or prompt cannot be used is reported (``failures.json``, the report, the
exit status) and not scored, and the other records go on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from radfm3d.evaluation import metrics as M
from radfm3d.evaluation.findings import finding_figures, load_vocabulary
from radfm3d.evaluation.metrics import RadFM3DInputError
from radfm3d.evaluation.report import write_report
from radfm3d.utils import JsonlAppender, atomic_write, atomic_write_json, json_default, writable_dir

CLOSED_VQA = ("presence", "side", "count", "type", "size_bucket", "size_category", "laterality", "yes_no")
OPEN_VQA = ("open", "location", "size", "where", "measurement")
TEXT_FAMILIES = ("report", "vqa_open", "referring", "rationale")
FIXED_FAMILIES = ("report", "modality", "region", "grounding", "referring", "comparison", "rationale")
COMPARISON_LABELS: dict[str, tuple[str, ...]] = {
    "new": ("new", "newly", "appeared", "interval development"),
    "grown": ("grown", "grew", "enlarged", "enlarging", "larger", "increased", "increase", "growing"),
    "shrunk": ("shrunk", "shrank", "smaller", "decreased", "decrease", "reduced", "shrinking", "regressed"),
    "resolved": ("resolved", "disappeared", "no longer", "gone", "resolution"),
    "stable": ("stable", "unchanged", "no change", "same", "no interval change"),
}


# ------------------------------------------------------------------------------------------- task families
def task_family(record: Mapping[str, Any]) -> str:
    """Family of a manifest record: report, modality, region, vqa_closed:<sub>, vqa_open, grounding, referring,
    comparison, rationale; an unknown task keeps its own name (scored as closed if it offers choices)."""
    task = str(record.get("task", "")).strip().lower()
    for fam in FIXED_FAMILIES:
        if task == fam or task.startswith(fam + "_") or task.startswith(fam + ":"):
            return fam
    if task.startswith("vqa"):
        sub = re.sub(r"^vqa[_:]?", "", task)
        sub = re.sub(r"^closed[_:]?", "", sub) or "closed"
        offers_choices = bool(record.get("choices"))
        if sub.startswith("open") or (not offers_choices and (sub in OPEN_VQA or sub not in CLOSED_VQA)):
            return "vqa_open"
        return f"vqa_closed:{sub}"
    return task or "unknown"


def family_kind(family: str, records: Sequence[Mapping[str, Any]] = ()) -> str:
    """'closed', 'text' or 'grounding'."""
    if family == "grounding":
        return "grounding"
    if family in TEXT_FAMILIES:
        return "text"
    if family in ("modality", "region", "comparison") or family.startswith("vqa_closed"):
        return "closed"
    return "closed" if any(r.get("choices") for r in records) else "text"


def comparison_label(text: str) -> str | None:
    """Canonical change label (new/grown/shrunk/resolved/stable) named in a text, or None if none or several."""
    norm = f" {M.normalize_answer(text)} "
    found = {lab for lab, words in COMPARISON_LABELS.items() if any(f" {w} " in norm for w in words)}
    if "resolved" in found and "stable" in found and " no longer " in norm:
        found.discard("stable")
    return next(iter(found)) if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------- reading
def _read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a predictions JSONL (:func:`radfm3d.data.manifest.read_jsonl`; a line torn by a kill is skipped)."""
    from radfm3d.data.manifest import read_jsonl

    return read_jsonl(path, allow_partial_last_line=True)


def read_records(manifest_path: str | os.PathLike,
                 failures: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Manifest records (`radfm3d.data.manifest.read_manifest`), image paths absolute.

    failures: None refuses the whole manifest when a record is invalid; a list instead gets
    ``{"id", "images", "run": "manifest", "problem": "line N: ..."}`` per invalid record (e.g. a prompt whose
    ``<image>`` count does not match its images), which is left out. Lines that are not JSON and duplicate ids
    always refuse the manifest (the file itself is in doubt).
    """
    from radfm3d.data.manifest import read_manifest, resolve_images, validate_record

    manifest_path = Path(manifest_path)
    if failures is None:
        records = read_manifest(manifest_path)
    else:
        records = read_manifest(manifest_path, validate=False)
        with manifest_path.open(encoding="utf-8") as fh:
            linenos = [n for n, line in enumerate(fh, 1) if line.strip()]
        kept, seen = [], {}
        for lineno, rec in zip(linenos, records):
            rid = rec.get("id") if isinstance(rec, dict) else None
            if isinstance(rid, str):
                if rid in seen:
                    raise RadFM3DInputError(manifest_path, f"line {lineno}: duplicate id {rid!r} (first on line "
                                                           f"{seen[rid]})")
                seen[rid] = lineno
            problems = validate_record(rec, base_dir=manifest_path.parent)
            if problems:
                failures.append({"id": str(rid) if rid is not None else f"line {lineno}",
                                 "images": list(rec.get("images") or []) if isinstance(rec, dict) else [],
                                 "run": "manifest", "problem": f"line {lineno}: " + "; ".join(problems)})
            else:
                kept.append(rec)
        records = kept
    for rec in records:
        rec["images"] = [str(p) for p in resolve_images(rec, manifest_path)]
    for i, rec in enumerate(records):
        if "id" not in rec:
            raise RadFM3DInputError(manifest_path, f"record {i + 1} has no 'id'")
    return records


def read_predictions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """A predictions JSONL file ({id, prediction, [choice_logliks], ...} per line) -> id -> entry."""
    out: dict[str, dict[str, Any]] = {}
    for lineno, row in enumerate(_read_jsonl(path), 1):
        if "id" not in row or "prediction" not in row:
            raise RadFM3DInputError(path, f"line {lineno} needs 'id' and 'prediction' keys, has {sorted(row)}")
        out[str(row["id"])] = row
    return out


def write_predictions(predictions: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write predictions as JSONL ({id, prediction, ...} per line), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for pid, entry in predictions.items():
                fh.write(json.dumps({"id": pid, **_entry(entry)}, default=json_default) + "\n")

    atomic_write(path, write)
    return path


def _entry(pred: Any) -> dict[str, Any]:
    """Normalise a prediction (text or dict) to a dict with a 'prediction' key."""
    if pred is None:
        return {"prediction": ""}
    if isinstance(pred, str):
        return {"prediction": pred}
    if isinstance(pred, Mapping):
        return {**pred, "prediction": str(pred.get("prediction", pred.get("text", "")) or "")}
    raise RadFM3DInputError("predictions", f"a prediction must be text or a dict, got {type(pred).__name__}")


# ---------------------------------------------------------------------------------------- reference answerers
def oracle_predictions(records: Sequence[Mapping[str, Any]], world_boxes: bool = True) -> dict[str, Any]:
    """Ground-truth answers as predictions (should score 100% everywhere).

    world_boxes: grounding records also carry their true world-mm boxes (IoU exactly 1); with False the
    `<box>` answer text is scored through the box codec (IoU < 1 from the 0-99 quantisation, hits 100%).
    """
    out: dict[str, Any] = {}
    for r in records:
        answer = str(r.get("answer", ""))
        boxes = true_boxes_world_mm(r) if world_boxes and task_family(r) == "grounding" else []
        out[str(r["id"])] = {"prediction": answer, "boxes_world_mm": boxes} if boxes else answer
    return out


def constant_predictions(
    records: Sequence[Mapping[str, Any]],
    train_records: Sequence[Mapping[str, Any]] | None = None,
    text: str | None = None,
) -> dict[str, str]:
    """A constant answerer: `text` for every record, or per task the most common training answer
    (`train_records`, else the evaluated records themselves)."""
    if text is not None:
        return {str(r["id"]): text for r in records}
    pool = train_records if train_records is not None else records
    by_task: dict[str, Counter] = defaultdict(Counter)
    surface: dict[tuple[str, str], str] = {}
    for r in pool:
        task, ans = str(r.get("task", "")), str(r.get("answer", ""))
        key = M.normalize_answer(ans)
        by_task[task][key] += 1
        surface.setdefault((task, key), ans)
    out = {}
    for r in records:
        task = str(r.get("task", ""))
        common = by_task[task].most_common(1)
        out[str(r["id"])] = surface[(task, common[0][0])] if common else ""
    return out


# --------------------------------------------------------------------------------------------- grounding
def true_boxes_world_mm(record: Mapping[str, Any]) -> list[list[float]]:
    """Target boxes [x1,y1,z1,x2,y2,z2] in world RAS mm of a grounding record's ground truth.

    Looks for `target(s)` entries, then top-level `box(es)_world_mm`, then the findings (all, or those named
    by `target_index`/`target_indices`/`target_ids`).
    """
    gt = record.get("ground_truth") or {}

    def boxes_of(obj: Any) -> list[list[float]]:
        if isinstance(obj, Mapping):
            if "box_world_mm" in obj:
                return [list(map(float, obj["box_world_mm"]))]
            if "boxes_world_mm" in obj:
                return [list(map(float, b)) for b in obj["boxes_world_mm"]]
            return []
        if isinstance(obj, (list, tuple)):
            if len(obj) == 6 and all(isinstance(v, (int, float)) for v in obj):
                return [list(map(float, obj))]
            return [b for item in obj for b in boxes_of(item)]
        return []

    for key in ("target", "targets"):
        if key in gt and boxes_of(gt[key]):
            return boxes_of(gt[key])
    if boxes_of({k: gt[k] for k in ("box_world_mm", "boxes_world_mm") if k in gt}):
        return boxes_of({k: gt[k] for k in ("box_world_mm", "boxes_world_mm") if k in gt})
    findings = list(gt.get("findings") or [])
    for key in ("target_indices", "target_index"):
        if key in gt:
            idx = gt[key] if isinstance(gt[key], list) else [gt[key]]
            findings = [findings[i] for i in idx if 0 <= int(i) < len(findings)]
            break
    else:
        ids = gt.get("target_ids", gt.get("target_id"))
        if ids is not None:
            ids = set(ids) if isinstance(ids, list) else {ids}
            findings = [f for f in findings if f.get("id") in ids]
    return boxes_of(findings)


def _grid_geometry(entry: Mapping[str, Any], record: Mapping[str, Any], recipe: Any, cache: dict) -> Any:
    """GridGeometry for a record: from the prediction, the ground truth, or by preprocessing its first image;
    None when the record has neither geometry nor image."""
    from radfm3d.transforms import GridGeometry

    geom = entry.get("grid_geometry") or (record.get("ground_truth") or {}).get("grid_geometry")
    if isinstance(geom, list):  # processor output: one per image
        geom = geom[0] if geom else None
    if geom is not None:
        return geom if isinstance(geom, GridGeometry) else GridGeometry.from_dict(geom)
    images = record.get("images") or []
    if not images:
        return None  # nothing to map the 0-99 text box through: it cannot hit, scored as no box
    key = (images[0], id(recipe))
    if key not in cache:
        cache[key] = grid_geometry_of_image(images[0], recipe)
    return cache[key]


def grid_geometry_of_image(path: str | os.PathLike, recipe: Any = None) -> Any:
    """GridGeometry of an image under a preprocessing recipe (default recipe if None): placed from the image's
    affine and shape, without resampling it."""
    from radfm3d.io import load_image
    from radfm3d.transforms import PreprocessingRecipe, grid_geometry_of

    return grid_geometry_of(load_image(path), recipe or PreprocessingRecipe())


def predicted_boxes_world_mm(entry: Mapping[str, Any], record: Mapping[str, Any], recipe: Any = None,
                             cache: dict | None = None) -> list[list[float]]:
    """World-mm boxes of a prediction: given directly, or parsed from `<box>` text through the grid geometry."""
    if entry.get("boxes_world_mm") is not None:
        return [list(map(float, b)) for b in entry["boxes_world_mm"]]
    from radfm3d.text.boxes import parse_boxes

    if not parse_boxes(entry["prediction"]):
        return []
    from radfm3d.text.postprocess import boxes_from_text

    geom = _grid_geometry(entry, record, recipe, {} if cache is None else cache)
    if geom is None:
        return []
    out = []
    for item in boxes_from_text(entry["prediction"], geom):
        box = item.get("box_world_mm", item.get("world_mm")) if isinstance(item, Mapping) else item
        if box is not None:
            out.append([float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)[:6]])
    return out


# ------------------------------------------------------------------------------------------------ scoring
def _score_family(
    family: str, records: Sequence[Mapping[str, Any]], entries: Sequence[dict[str, Any]], *,
    embeddings: bool, recipe: Any, geom_cache: dict, bootstrap: dict, vocab: Any = None,
) -> tuple[dict[str, M.Figure], list[dict[str, Any]], list[str]]:
    """Figures, per-case rows and notes of one family for one set of predictions."""
    kind = family_kind(family, records)
    preds = [e["prediction"] for e in entries]
    answers = [str(r.get("answer", "")) for r in records]
    figures: dict[str, M.Figure] = {}
    notes: list[str] = []
    cases: list[dict[str, Any]] = [{"id": r["id"], "prediction": p, "answer": a}
                                   for r, p, a in zip(records, preds, answers)]
    nll = [e.get("answer_nll") for e in entries]
    if any(v is not None for v in nll):
        figures["answer_nll"] = M.bootstrap_figure([np.nan if v is None else float(v) for v in nll], **bootstrap)
        for c, v in zip(cases, nll):
            c["answer_nll"] = v
    if kind == "closed":
        correct = []
        for r, p, a, c in zip(records, preds, answers, cases):
            ok = M.closed_correct(p, a, r.get("choices"))
            if not ok and family == "comparison" and not r.get("choices"):
                ok = comparison_label(a) is not None and comparison_label(p) == comparison_label(a)
            c["correct"] = bool(ok)
            correct.append(ok)
        figures["accuracy"] = M.accuracy(correct, **bootstrap)
        ll = [(r, e) for r, e in zip(records, entries) if r.get("choices") and e.get("choice_logliks") is not None]
        if ll:
            figures["accuracy_likelihood"] = M.accuracy(
                [M.likelihood_correct(e["choice_logliks"], str(r.get("answer", "")), r["choices"]) for r, e in ll],
                **bootstrap)
    elif kind == "text":
        figures["bleu4"] = M.bleu4(preds, answers, **bootstrap)
        figures["rouge_l"] = M.rouge_l(preds, answers, **bootstrap)
        if embeddings:
            try:
                figures["embedding_similarity"] = M.embedding_similarity(preds, answers, **bootstrap)
            except ImportError as err:
                notes.append(f"embedding similarity skipped: {err}")
        fig, per_case = finding_figures(preds, answers, vocab=vocab, **bootstrap)
        if any(pc["reference"] for pc in per_case):
            figures.update(fig)
            for c, pc in zip(cases, per_case):
                c.update({"finding_f1": pc["f1"], "findings_predicted": pc["predicted"],
                          "findings_reference": pc["reference"]})
        else:  # e.g. "In the left lung.": no finding to count, and an empty-vs-empty F1 of 1 would flatter anyone
            notes.append("finding-level F1 not applicable: the references name no findings")
    else:  # grounding
        ious, errs = [], []
        for r, e, c in zip(records, entries, cases):
            true = true_boxes_world_mm(r)
            if not true:
                notes.append(f"{r['id']}: no ground-truth box; case skipped")
                continue
            try:
                pred = predicted_boxes_world_mm(e, r, recipe, geom_cache)
            except ImportError as err:
                notes.append(f"grounding from text needs the box codec ({err}); family not scored")
                return {}, cases, notes
            except RadFM3DInputError as err:  # its image cannot place the <box> text: a miss, said so
                notes.append(f"{r['id']}: box not placed ({err}); scored as no box")
                pred = []
            g = M.grounding_case(pred, true)
            c.update({**g, "pred_boxes_world_mm": pred, "true_boxes_world_mm": true})
            ious.append(g["iou"])
            errs.append(g["centre_error_mm"])
        if ious:
            figures.update(M.grounding_figures(ious, errs, **bootstrap))
    return figures, cases, notes


def _chance(family: str, records: Sequence[Mapping[str, Any]],
            train_records: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """Chance levels of a closed family: uniform over choices and the majority answer (of training data if given).

    The majority level is the accuracy of always giving the most common training (else evaluated) answer.
    """
    levels = M.chance_levels([str(r.get("answer", "")) for r in records], [r.get("choices") for r in records])
    if train_records:
        train = [t for t in train_records if task_family(t) == family]
        if train:
            common = Counter(M.normalize_answer(str(t.get("answer", ""))) for t in train).most_common(1)[0][0]
            levels["majority"] = float(np.mean([M.normalize_answer(str(r.get("answer", ""))) == common
                                                for r in records]))
            levels["majority_source"] = "train"
    levels.setdefault("majority_source", "evaluated")
    levels["level"] = max(v for v in (levels["uniform"], levels["majority"]) if v is not None)
    return levels


def near_chance(fig: M.Figure | None, chance_level: float | None) -> bool | None:
    """True when the interval reaches down to chance (the run is not distinguishable from a trivial answerer)."""
    if fig is None or chance_level is None or not np.isfinite(fig.low):
        return None
    return bool(fig.low <= chance_level + 1e-9)


def evaluate_predictions(
    manifest_records: Sequence[Mapping[str, Any]],
    predictions: Mapping[str, Any],
    blind_predictions: Mapping[str, Any] | None = None,
    *,
    train_records: Sequence[Mapping[str, Any]] | None = None,
    embeddings: bool = True,
    recipe: Any = None,
    n_resamples: int = M.N_RESAMPLES,
    seed: int = M.BOOTSTRAP_SEED,
    name: str = "model",
    label_schema: Any = None,
) -> dict[str, Any]:
    """Score predictions (and a blind baseline) on manifest records, grouped by task family.

    label_schema: a label schema (JSON data or the path of its file) whose finding types, flags and structures join
    the report finding-F1 vocabulary (:func:`radfm3d.evaluation.findings.load_vocabulary`).

    predictions: id -> text, or id -> {"prediction", "choice_logliks"?, "grid_geometry"?, "boxes_world_mm"?}.
    Records without a prediction count as an empty answer (listed under `missing`).
    -> {"meta", "families": {family: {"kind", "n", "tasks", "figures", "blind", "chance", "near_chance",
       "notes"}}, "cases": {family: [...]}, "summary": [str]} (figures are Figure.to_dict()).
    """
    bootstrap = {"n_resamples": n_resamples, "seed": seed}
    vocab = load_vocabulary(label_schema)
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in manifest_records:
        groups[task_family(r)].append(r)
    runs = {"model": predictions}
    if blind_predictions is not None:
        runs["blind"] = blind_predictions
    missing = {k: [str(r["id"]) for r in manifest_records if str(r["id"]) not in p] for k, p in runs.items()}
    geom_cache: dict = {}
    families: dict[str, Any] = {}
    all_cases: dict[str, Any] = {}
    for family in sorted(groups):
        recs = groups[family]
        fam: dict[str, Any] = {"kind": family_kind(family, recs), "n": len(recs),
                               "tasks": sorted({str(r.get("task", "")) for r in recs}), "notes": []}
        for run, preds in runs.items():
            entries = [_entry(preds.get(str(r["id"]))) for r in recs]
            figs, cases, notes = _score_family(family, recs, entries, embeddings=embeddings, recipe=recipe,
                                               geom_cache=geom_cache, bootstrap=bootstrap, vocab=vocab)
            fam["figures" if run == "model" else "blind"] = {k: f.to_dict() for k, f in figs.items()}
            fam["notes"] += [f"{run}: {n}" for n in dict.fromkeys(notes)]
            if run == "model":
                all_cases[family] = cases
            else:
                for c, b in zip(all_cases[family], cases):
                    c["blind_prediction"] = b["prediction"]
                    if "answer_nll" in b:
                        c["blind_answer_nll"] = b["answer_nll"]
        gain = image_gain(all_cases[family], bootstrap)
        if gain is not None:
            fam["image_gain"] = gain
        if fam["kind"] == "closed":
            fam["chance"] = _chance(family, recs, train_records)
            fam["near_chance"] = {
                run: {k: near_chance(M.Figure.from_dict(v), fam["chance"]["level"])
                      for k, v in fam["figures" if run == "model" else "blind"].items()}
                for run in runs
            }
        families[family] = fam
    results = {
        "meta": {"name": name, "n_records": len(manifest_records), "runs": sorted(runs),
                 "missing_predictions": {k: len(v) for k, v in missing.items()},
                 "bootstrap": {"n_resamples": n_resamples, "seed": seed, "interval": "percentile 95%"},
                 "finding_vocabulary": vocab.source,
                 "units": {"bleu4": "fraction (sacrebleu/100)", "centre_error_mm": "mm, world RAS of the original scan"}},
        "families": families,
        "cases": all_cases,
    }
    results["summary"] = summarize(results)
    return results


def image_gain(cases: Sequence[Mapping[str, Any]], bootstrap: Mapping[str, Any]) -> dict[str, Any] | None:
    """How much the image lowers the reference answer's NLL: per record, the blind run's ``answer_nll`` minus the
    model's (nats per answer token; > 0: the answer is likelier with the real image), mean with a paired bootstrap
    95% interval over the records that have both. None when no record has both."""
    diffs = [float(c["blind_answer_nll"]) - float(c["answer_nll"]) for c in cases
             if c.get("answer_nll") is not None and c.get("blind_answer_nll") is not None]
    if not diffs:
        return None
    return M.bootstrap_figure(diffs, **bootstrap).to_dict()


def summarize(results: Mapping[str, Any]) -> list[str]:
    """One line per closed family and run: accuracy vs chance; one per family with an image gain."""
    lines = []
    for family, fam in results["families"].items():
        gain = fam.get("image_gain")
        if gain and gain.get("value") is not None:
            verdict = ("the image helps" if gain["low"] > 0 else "the image hurts" if gain["high"] < 0
                       else "NO IMAGE EFFECT")
            lines.append(f"{family}: image gain {gain['value']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}] "
                         f"nats/token (blind - model answer NLL, n={gain['n']}) -> {verdict}")
        if fam["kind"] != "closed" or "accuracy" not in fam.get("figures", {}):
            continue
        level = fam["chance"]["level"]
        for run in ("model", "blind"):
            figs = fam["figures"] if run == "model" else fam.get("blind")
            if not figs or "accuracy" not in figs:
                continue
            f = figs["accuracy"]
            verdict = "NEAR CHANCE" if fam["near_chance"][run]["accuracy"] else "above chance"
            lines.append(f"{family} [{run}]: accuracy {f['value']:.3f} [{f['low']:.3f}, {f['high']:.3f}] "
                         f"vs chance {level:.3f} -> {verdict}")
    return lines


# ------------------------------------------------------------------------------------------ model running
def _prompts_and_images(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Prompts and, per record, its images: paths, or images read with the record's ``image_series`` /
    ``image_meta`` (:func:`radfm3d.data.image_meta.record_images`)."""
    from radfm3d.data.image_meta import record_images

    return [str(r.get("prompt", "")) for r in records], [record_images(r) for r in records]


def _problem(err: BaseException) -> str:
    return str(err) if isinstance(err, RadFM3DInputError) else f"{type(err).__name__}: {err}".strip()


def _generate_batch(model: Any, processor: Any, batch: Sequence[Mapping[str, Any]], *, max_new_tokens: int,
                    blank_images: bool, likelihood: bool) -> list[dict[str, Any]]:
    """Greedy answers (and the likelihood entries, :func:`_likelihood_entries`) of one batch of records -> one entry
    per record."""
    import torch

    device = next(model.parameters()).device
    texts, images = _prompts_and_images(batch)
    enc = processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding_side="left")
    geoms = enc.pop("grid_geometry", None) if hasattr(enc, "pop") else None
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in enc.items()}
    if blank_images and inputs.get("pixel_values") is not None:
        inputs["pixel_values"] = torch.zeros_like(inputs["pixel_values"])
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = ids[:, inputs["input_ids"].shape[1]:]
    decoded = processor.batch_decode(new, skip_special_tokens=True)
    entries = []
    for i, (r, text) in enumerate(zip(batch, decoded)):
        entry: dict[str, Any] = {"prediction": text.strip()}
        if geoms is not None and i < len(geoms) and geoms[i]:
            g = geoms[i][0] if isinstance(geoms[i], list) else geoms[i]
            entry["grid_geometry"] = g.to_dict() if hasattr(g, "to_dict") else g
        if likelihood:
            entry.update(_likelihood_entries(model, processor, r, blank_images=blank_images))
        entries.append(entry)
    return entries


def generate_predictions(
    model: Any, processor: Any, records: Sequence[Mapping[str, Any]], *, batch_size: int = 4,
    max_new_tokens: int = 128, blank_images: bool = False, likelihood: bool = True, progress: bool = True,
    desc: str = "generate", output_file: str | os.PathLike | None = None,
    failures: list[dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Greedy generation (and, with ``likelihood``, the log-likelihood of each offered choice and the reference
    answer's NLL) for every record.

    blank_images=True gives the blind baseline: same prompts, pixel_values replaced by zeros of the grid shape.
    output_file: a predictions JSONL that every entry is appended to (flushed) as soon as its batch is generated;
    records whose id it already holds are not generated again (resume) and come back from the file.
    failures: a list that gets ``{"id", "images", "run", "problem"}`` for each record that could not be generated
    (unreadable image, prompt the processor refuses, ...); a batch that fails is retried record by record so only
    the bad record is lost. Without it, the first failure raises.
    -> id -> {"prediction", "grid_geometry" (first image's, dict), "choice_logliks" (records with choices),
    "answer_nll" (records with an answer, nats per answer token)}.
    """
    from tqdm.auto import tqdm

    out: dict[str, dict[str, Any]] = {}
    appender = JsonlAppender(output_file) if output_file is not None else None
    try:
        if appender is not None:
            wanted = {str(r["id"]) for r in records}
            out = {k: v for k, v in read_predictions(appender.path).items() if k in wanted}
        todo = [r for r in records if str(r["id"]) not in out]
        model.eval()
        kw = dict(max_new_tokens=max_new_tokens, blank_images=blank_images, likelihood=likelihood)
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=desc, disable=not progress)

        def run(batch: Sequence[Mapping[str, Any]]) -> None:
            try:
                entries = _generate_batch(model, processor, batch, **kw)
            except Exception as err:
                if failures is None:
                    raise
                if len(batch) > 1:  # find the bad record(s): the others still get their answers
                    for r in batch:
                        run([r])
                    return
                failures.append({"id": str(batch[0]["id"]), "images": list(batch[0].get("images") or []),
                                 "run": desc, "problem": _problem(err)})
                bar.update(1)
                return
            for r, entry in zip(batch, entries):
                out[str(r["id"])] = entry
                if appender is not None:
                    appender.write({"id": str(r["id"]), **entry})
            bar.update(len(batch))

        for start in range(0, len(todo), batch_size):
            run(todo[start : start + batch_size])
        bar.close()
    finally:
        if appender is not None:
            appender.close()
    return out


def preprocessed_record_images(processor: Any, record: Mapping[str, Any]) -> list[Any]:
    """The record's images read and preprocessed once: ``(C, H, W, D)`` MetaTensors carrying their grid geometry,
    for ``processor.build_training_example(..., images_are_preprocessed=True)`` (every answer, both runs)."""
    from monai.data import MetaTensor

    from radfm3d.data.image_meta import record_images

    out = []
    for image in record_images(record):
        tensor, geometry = processor.preprocess_image(image)
        out.append(MetaTensor(tensor, meta={"grid_geometry": geometry}))
    return out


def answer_log_likelihoods(model: Any, processor: Any, record: Mapping[str, Any], answers: Sequence[str], *,
                           blank_images: bool = False, images: Sequence[Any] | None = None,
                           ) -> tuple[list[float], list[int]]:
    """Teacher-forced log-probability of each of ``answers`` given the record's prompt and images.

    -> (summed log-probability of each answer's tokens (nats), number of those tokens). One forward for all answers;
    ``blank_images`` replaces the pixels by zeros of the grid shape (the blind baseline's input). ``images``: the
    record's images from :func:`preprocessed_record_images` (read here when not given).
    """
    import torch

    device = next(model.parameters()).device
    if images is None:
        images = preprocessed_record_images(processor, record)
    examples = [processor.build_training_example(str(record.get("prompt", "")), str(answer), list(images),
                                                 images_are_preprocessed=True)
                for answer in answers]
    pad_id = getattr(getattr(processor, "tokenizer", None), "pad_token_id", None) or 0
    width = max(int(torch.as_tensor(e["input_ids"]).reshape(-1).shape[0]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        x = torch.as_tensor(e["input_ids"]).reshape(-1)
        ids[i, : x.shape[0]] = x
        labels[i, : x.shape[0]] = torch.as_tensor(e["labels"]).reshape(-1)
        mask[i, : x.shape[0]] = 1
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if examples[0].get("pixel_values") is not None:
        pv = [torch.as_tensor(e["pixel_values"]) for e in examples]
        pv = torch.stack([p[0] if p.ndim == 6 else p for p in pv])
        inputs["pixel_values"] = torch.zeros_like(pv).to(device) if blank_images else pv.to(device)
        if examples[0].get("image_mask") is not None:
            im = [torch.as_tensor(e["image_mask"]) for e in examples]
            inputs["image_mask"] = torch.stack([m[0] if m.ndim == 2 else m for m in im]).to(device)
    with torch.inference_mode():
        logits = model(**inputs).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:].to(device)
    keep = target != -100
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * keep).sum(-1).tolist(), keep.sum(-1).tolist()


def choice_log_likelihoods(model: Any, processor: Any, record: Mapping[str, Any], *,
                           blank_images: bool = False) -> list[float]:
    """Summed log-probability (nats) of each choice's answer tokens given the record's prompt and images."""
    return answer_log_likelihoods(model, processor, record, list(record["choices"]), blank_images=blank_images)[0]


def _likelihood_entries(model: Any, processor: Any, record: Mapping[str, Any], *,
                        blank_images: bool, images: Sequence[Any] | None = None) -> dict[str, Any]:
    """``choice_logliks`` (records with choices) and ``answer_nll``: the reference answer's teacher-forced negative
    log-likelihood, nats per answer token (records with an answer). The reference shares the choices' forward pass
    when it is one of them."""
    answer = str(record.get("answer", "") or "")
    choices = [str(c) for c in record.get("choices") or []]
    answers = choices + ([answer] if answer.strip() and answer not in choices else [])
    if not answers:
        return {}
    logliks, counts = answer_log_likelihoods(model, processor, record, answers, blank_images=blank_images,
                                             images=images)
    entry: dict[str, Any] = {}
    if choices:
        entry["choice_logliks"] = logliks[: len(choices)]
    if answer.strip():
        at = answers.index(answer)
        entry["answer_nll"] = -logliks[at] / counts[at] if counts[at] else None
    return entry


def add_answer_nll(model: Any, processor: Any, manifest: str | os.PathLike, predictions_file: str | os.PathLike,
                   blind_predictions_file: str | os.PathLike | None = None, *, progress: bool = True) -> None:
    """Add ``answer_nll`` (and ``choice_logliks``) to every entry of a predictions JSONL, in place (atomic rewrite),
    with the real images, and to the blind baseline's file, when given, with blank ones.

    For predictions made by another engine (the bundles' ``evaluate.json``): the harness then reports the answer NLL
    of both runs and the image gain (:func:`image_gain`). Each record's images are read once for both files; entries
    that already carry ``answer_nll`` are kept.
    """
    from tqdm.auto import tqdm

    runs = [(Path(predictions_file), False)]
    if blind_predictions_file is not None:
        runs.append((Path(blind_predictions_file), True))
    preds = {path: read_predictions(path) for path, _ in runs}
    records = {str(r["id"]): r for r in read_records(manifest)}
    todo = {path: {k for k, e in preds[path].items() if "answer_nll" not in e and k in records} for path, _ in runs}
    model.eval()
    for key in tqdm([k for k in records if any(k in t for t in todo.values())], desc="answer NLL",
                    disable=not progress):
        images = preprocessed_record_images(processor, records[key])
        for path, blank in runs:
            if key in todo[path]:
                preds[path][key].update(_likelihood_entries(model, processor, records[key], blank_images=blank,
                                                            images=images))
    for path, _ in runs:
        write_predictions(preds[path], path)


def run_model(
    model: Any, processor: Any, records: Sequence[Mapping[str, Any]], *, out_dir: str | os.PathLike | None = None,
    blind: bool = True, batch_size: int = 4, max_new_tokens: int = 128, likelihood: bool = True,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """The model's and (``blind``) the blind baseline's predictions for ``records``, and the records that failed.

    With ``out_dir`` each prediction is appended to ``predictions.jsonl`` / ``blind_predictions.jsonl`` there as it is
    made, and a rerun skips what those files already hold. -> (predictions, blind predictions or None, failures).
    """
    failures: list[dict[str, Any]] = []
    out = Path(out_dir) if out_dir is not None else None
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, likelihood=likelihood, progress=progress,
              failures=failures)
    preds = generate_predictions(model, processor, records, desc="model",
                                 output_file=None if out is None else out / "predictions.jsonl", **kw)
    blind_preds = None
    if blind:
        blind_preds = generate_predictions(model, processor, _without_failed(records, failures), blank_images=True,
                                           desc="blind",
                                           output_file=None if out is None else out / "blind_predictions.jsonl", **kw)
    return preds, blind_preds, failures


def _without_failed(records: Sequence[Mapping[str, Any]], failures: Sequence[Mapping[str, Any]]) -> list:
    failed = {str(f["id"]) for f in failures}
    return [r for r in records if str(r["id"]) not in failed]


def evaluate_model(
    model: Any, processor: Any, manifest_path: str | os.PathLike | Sequence[Mapping[str, Any]], *,
    batch_size: int = 4, max_new_tokens: int = 128, blind: bool = True, likelihood: bool = True,
    limit: int | None = None, progress: bool = True, train_records: Sequence[Mapping[str, Any]] | None = None,
    embeddings: bool = True, name: str = "model", out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run a radfm3d model on a manifest (and the blind baseline, :func:`run_model`) and score it.

    Invalid records (see :func:`read_records`) and records that could not be generated are not scored; they are
    listed under ``failures`` and counted in ``meta["failed_records"]``. ``out_dir``: predictions are appended there
    as they are made and a rerun resumes (:func:`run_model`). -> evaluate_predictions(...) results with
    ``predictions`` / ``blind_predictions`` (id -> entry) and ``failures`` added.
    """
    failures: list[dict[str, Any]] = []
    records = read_records(manifest_path, failures=failures) if isinstance(manifest_path, (str, os.PathLike)) \
        else list(manifest_path)
    records = records[:limit] if limit else records
    preds, blind_preds, generation_failures = run_model(model, processor, records, out_dir=out_dir, blind=blind,
                                                        batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                        likelihood=likelihood, progress=progress)
    failures += generation_failures
    results = evaluate_predictions(_without_failed(records, failures), preds, blind_preds,
                                   train_records=train_records, embeddings=embeddings,
                                   recipe=getattr(processor, "recipe", None), name=name)
    _add_failures(results, failures)
    results["predictions"] = preds
    results["blind_predictions"] = blind_preds
    return results


def _add_failures(results: dict[str, Any], failures: Sequence[Mapping[str, Any]]) -> None:
    results["failures"] = list(failures)
    results["meta"]["failed_records"] = len({str(f["id"]) for f in failures})


def prepare_output_dir(out: str | os.PathLike) -> Path:
    """The ``--out`` folder, created and proven writable before any work (:func:`radfm3d.utils.writable_dir`).

    Raises RadFM3DInputError when it is an existing file, cannot be created, or cannot be written.
    """
    return writable_dir(out, "--out")


def _check_resume(out: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to append to predictions made otherwise (``run.json`` in ``out`` records the generation settings);
    record the settings otherwise."""
    path = out / "run.json"
    before = None
    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
    if isinstance(before, dict):
        diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if diff:
            raise RadFM3DInputError(out, "holds predictions made with other settings ("
                                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                                         + "); give another --out (or delete its predictions to start over)")
    else:
        for name in ("predictions.jsonl", "blind_predictions.jsonl"):
            if (out / name).is_file() and (out / name).stat().st_size > 0:
                raise RadFM3DInputError(out / name, "holds predictions that no --model run of this folder made "
                                                    "(no run.json beside it); give another --out")
    atomic_write_json(path, dict(settings))


# --------------------------------------------------------------------------------------------------- CLI
def cli(argv: Iterable[str] | None = None) -> int:
    """`radfm3d evaluate --manifest test.jsonl (--predictions preds.jsonl | --model DIR) --out DIR`.

    Exit status 0, or 1 when some records were invalid or could not be generated (they are listed in
    ``failures.json`` and the report, and not scored; everything else is written first).
    """
    p = argparse.ArgumentParser(prog="radfm3d evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help="task manifest JSONL (paths relative to its folder)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help="JSONL of {id, prediction[, choice_logliks]} to score")
    src.add_argument("--model", help="radfm3d model folder (model + processor) to run; predictions are appended to "
                                     "OUT/predictions.jsonl as they are made and a rerun skips those already there")
    src.add_argument("--oracle", action="store_true", help="score the ground-truth answers (sanity check)")
    src.add_argument("--constant", action="store_true", help="score the most common answer per task (chance)")
    p.add_argument("--blind-predictions", help="JSONL of the blind baseline's predictions")
    p.add_argument("--train-manifest", help="training manifest: majority-answer chance levels come from it")
    p.add_argument("--out", required=True, help="output folder (results.json, report.md, PNG figures)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--no-blind", action="store_true", help="with --model: skip the blind baseline")
    p.add_argument("--no-embeddings", action="store_true", help="skip the sentence-encoder similarity")
    p.add_argument("--recipe", help="preprocessing.json used to place <box> answers (default: the model's)")
    p.add_argument("--label-schema", help="label_schema.json whose findings join the report finding-F1 vocabulary "
                                          "(default: the model's, when it has one)")
    p.add_argument("--n-resamples", type=int, default=M.N_RESAMPLES)
    p.add_argument("--seed", type=int, default=M.BOOTSTRAP_SEED)
    p.add_argument("--cases", type=int, default=4, help="grounding cases drawn on slices")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(list(argv) if argv is not None else None)

    out = prepare_output_dir(args.out)
    failures: list[dict[str, Any]] = []
    records = read_records(args.manifest, failures=failures)
    if args.limit:
        records = records[: args.limit]
    train = read_records(args.train_manifest) if args.train_manifest else None
    recipe = None
    if args.recipe:
        from radfm3d.transforms import PreprocessingRecipe

        recipe = PreprocessingRecipe.load(args.recipe)
    blind = read_predictions(args.blind_predictions) if args.blind_predictions else None
    common = dict(train_records=train, embeddings=not args.no_embeddings, n_resamples=args.n_resamples,
                  seed=args.seed)
    if args.model:
        from radfm3d.modeling.model import RadFM3DForCausalLM
        from radfm3d.processing import RadFM3DProcessor

        _check_resume(out, {"model": str(Path(args.model).resolve()), "max_new_tokens": args.max_new_tokens,
                            "likelihood": True})
        model = RadFM3DForCausalLM.from_pretrained(args.model).to(args.device)
        processor = RadFM3DProcessor.from_pretrained(args.model)
        recipe = recipe or getattr(processor, "recipe", None)
        preds, generated_blind, generation_failures = run_model(
            model, processor, records, out_dir=out, blind=blind is None and not args.no_blind,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        failures += generation_failures
        blind = blind if blind is not None else generated_blind
        name = Path(args.model).name
    elif args.predictions:
        preds, name = read_predictions(args.predictions), Path(args.predictions).stem
    elif args.oracle:
        preds, name = oracle_predictions(records), "oracle"
    else:
        preds, name = constant_predictions(records, train), "constant"
    schema = args.label_schema
    if schema is None and args.model and (Path(args.model) / "label_schema.json").is_file():
        schema = Path(args.model) / "label_schema.json"
    scored = _without_failed(records, failures)
    results = evaluate_predictions(scored, preds, blind, recipe=recipe, name=name, label_schema=schema, **common)
    _add_failures(results, failures)
    if not args.model:  # with --model they were written as they were made
        if (out / "run.json").is_file():  # these predictions are not a model run's any more
            (out / "run.json").unlink()
        write_predictions(preds, out / "predictions.jsonl")
        if blind is not None:
            write_predictions(blind, out / "blind_predictions.jsonl")
    if failures:
        atomic_write_json(out / "failures.json", failures)
    elif (out / "failures.json").is_file():  # an earlier run's: those records have predictions now
        (out / "failures.json").unlink()
    paths = write_report(results, out, records=scored, predictions=preds, n_cases=args.cases)
    print("\n".join(results["summary"]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if failures:
        n_all = len(records) + sum(f["run"] == "manifest" for f in failures)
        print(f"{len({f['id'] for f in failures})} of {n_all} record(s) could not be used and were not scored "
              f"(listed in {out / 'failures.json'}):")
        for f in failures:
            print(f"  {f['id']} [{f['run']}]: {f['problem']}")
        return 1
    return 0
