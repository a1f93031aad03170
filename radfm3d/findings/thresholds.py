# Copyright (c) radfm3d contributors. Apache-2.0.
"""How good is a findings model's reading, site by site, and which threshold should it use?

The reading (:mod:`radfm3d.findings.reader`) names, for every finding site of the scan's region, the best finding
type when its score passes the reader's threshold. Against the structured labels of ``cases.jsonl`` under the
model's label schema (:func:`radfm3d.findings.labels.labels_for_image`), each (image, site) pair is one decision:
does the site hold a finding, and of which type (the largest one's). :func:`reading_sites` scores every site once
(threshold off), :func:`threshold_table` turns the scores into accuracy / recall / specificity / type accuracy
per threshold, so the threshold can be chosen on a validation split (``radfm3d reading-threshold``) instead of
guessed. Sites are read in the model's predicted region, as at inference; a wrong region counts every true site it
hides as missed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SiteScore", "reading_sites", "threshold_table", "best_threshold", "cli"]


@dataclass(frozen=True)
class SiteScore:
    """One (image, finding site) decision: the reading's best type and its score (0 when the site was not read), the
    truth (largest finding's type or None)."""

    image: str
    structure: str
    score: float
    predicted_type: str | None
    true_type: str | None


@torch.no_grad()
def reading_sites(model: Any, recipe: Any, cases_file: str | os.PathLike, split: str | None = "val",
                  cache_dir: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 8,
                  progress: bool = True) -> list[SiteScore]:
    """Score every finding site of every image of ``split`` (current scans and priors) with the model's reading.

    ``model``: a :class:`~radfm3d.findings.model.RadFM3DFindingsModel` whose schema has findings; ``recipe``: its
    ``PreprocessingRecipe`` (the
    processor's ``recipe``); with ``cache_dir`` images go through the preprocessed-image cache.
    """
    from radfm3d.data.cache import PreprocessedImageCache
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.findings.labels import structured_records
    from radfm3d.utils import progress_bar

    reader = getattr(model, "reader", None)
    if reader is None:
        raise RadFM3DInputError("model", "this model has no findings reader, so there is no reading to score")
    schema = reader.schema
    if not schema.has_findings:
        raise RadFM3DInputError("model", f"the label schema {schema.name!r} has no finding sites to score")
    cache = PreprocessedImageCache(cache_dir, recipe) if cache_dir is not None else None
    records = structured_records(cases_file, schema, split=split)[: None if limit is None else int(limit)]
    all_sites = set(schema.all_site_structures())
    rows: list[SiteScore] = []
    bar = progress_bar(len(records), enabled=progress, desc="reading", unit="scan")
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            pixels = torch.stack([_load(cache, recipe, r["image"]) for r in chunk]).unsqueeze(1)
            # threshold -1: every site of the predicted region is written with its best type's score
            for record, reading in zip(chunk, model.read_findings(pixels, threshold=-1.0)):
                found = {f["structure"]: (f["score"], f["type"]) for f in reading[0]["findings"]}
                label = record["label"]
                for index, structure in enumerate(schema.structures):
                    if structure not in all_sites or label["structure_present"][index] <= 0:
                        continue
                    true_index = int(label["finding_type"][index])
                    score, kind = found.get(structure, (0.0, None))
                    rows.append(SiteScore(record["image"], structure, float(score), kind,
                                          schema.finding_types[true_index] if true_index >= 0 else None))
            bar.update(len(chunk))
    finally:
        bar.close()
    return rows


def _load(cache: Any, recipe: Any, image: str) -> torch.Tensor:
    if cache is not None:
        return cache(image).as_tensor().float()
    from radfm3d.transforms import preprocess

    return torch.as_tensor(preprocess(image, recipe)).float()


def threshold_table(rows: Sequence[SiteScore], thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Per threshold: ``accuracy`` (site holds a finding or not), ``recall``, ``specificity``,
    ``balanced_accuracy``, ``type_accuracy`` (right type among true sites read as holding one), ``exact`` (presence and
    type both right: what a report sentence about the site needs), and ``n`` sites."""
    table = []
    for t in thresholds:
        said = [r.score > t for r in rows]
        truth = [r.true_type is not None for r in rows]
        pos = [s for s, y in zip(said, truth) if y]
        neg = [not s for s, y in zip(said, truth) if not y]
        typed = [r.predicted_type == r.true_type for r, s, y in zip(rows, said, truth) if s and y]
        exact = [(s and r.predicted_type == r.true_type) if y else not s for r, s, y in zip(rows, said, truth)]
        recall, specificity = _mean(pos), _mean(neg)
        table.append({"threshold": float(t), "accuracy": _mean([s == y for s, y in zip(said, truth)]),
                      "recall": recall, "specificity": specificity,
                      "balanced_accuracy": (recall + specificity) / 2, "type_accuracy": _mean(typed),
                      "exact": _mean(exact), "n": float(len(rows))})
    return table


def _mean(values: Sequence[bool]) -> float:
    return float(sum(values)) / len(values) if values else float("nan")


def best_threshold(table: Sequence[dict[str, float]], key: str = "exact") -> dict[str, float]:
    """The row of ``table`` with the highest ``key`` (ties: the lower threshold)."""
    return max(table, key=lambda row: (row[key], -row["threshold"]))


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d reading-threshold MODEL --cases CASES``: score the findings reading per threshold."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="radfm3d reading-threshold", description=(
        "Score a findings model's reading site by site against the structured labels of a cases.jsonl split "
        "and print accuracy, recall, specificity and type accuracy per threshold, to choose the threshold on "
        "validation data (set it with: radfm3d findings-prompt MODEL --replace --threshold T)."))
    parser.add_argument("model", help="findings model folder")
    parser.add_argument("--cases", required=True, help="cases.jsonl with structured labels")
    parser.add_argument("--split", default="val", help="split to score (default val; 'all' for every case)")
    parser.add_argument("--cache", default=None, help="preprocessed-image cache folder (optional)")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many images")
    parser.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                        help="comma-separated thresholds (default 0.3,0.4,...,0.9)")
    parser.add_argument("--by", default="exact", choices=("exact", "accuracy", "balanced_accuracy"),
                        help="figure the recommended threshold maximises (default exact)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(list(argv) if argv is not None else None)
    from radfm3d.engine.training import load_processor, load_trained_model

    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    model = load_trained_model(args.model)
    rows = reading_sites(model, load_processor(args.model).recipe, args.cases,
                         None if args.split == "all" else args.split, args.cache, args.limit)
    table = threshold_table(rows, thresholds)
    print(f"{len(rows)} sites, {sum(r.true_type is not None for r in rows)} with a finding; current threshold "
          f"{model.reader.settings['threshold']}")
    print("threshold  accuracy  recall  specificity  balanced  type_acc  exact")
    for row in table:
        print(f"{row['threshold']:9.2f}  {row['accuracy']:8.3f}  {row['recall']:6.3f}  {row['specificity']:11.3f}  "
              f"{row['balanced_accuracy']:8.3f}  {row['type_accuracy']:8.3f}  {row['exact']:5.3f}")
    best = best_threshold(table, args.by)
    print(f"best by {args.by}: threshold {best['threshold']}")
    if args.json:
        from pathlib import Path

        from radfm3d.utils import atomic_write

        text = json.dumps({"sites": len(rows), "table": table, "best": best}, indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0
