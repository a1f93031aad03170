# Copyright (c) radfm3d contributors. Apache-2.0.
"""Re-fit the finding boxes of a finished findings model's head on more cases, everything else frozen.

Box snapping (:mod:`radfm3d.findings.box_snapping`) writes the latent head's ``finding_box`` into grounding answers,
so those boxes are worth training further; but the head also gives the reading the LLM was trained with. Only the
rows of the head's last ``Linear`` that produce ``finding_box`` are trained here (the hidden layer, every other
output, the encoder and the LLM keep their exact weights), so the reading, and every answer without a box, stay the
same. The head's hidden features are computed once per image (one encoder pass, ~0.04 s on 2 CPU cores) and the rows
are fitted on them in seconds with L1 + (1 - IoU) on the largest finding of each structure; the step with the best
validation hit@0.3 is kept. Why not more epochs of stage 0: it trains the encoder too and would move the reading.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["head_features", "fit_finding_box_rows", "refit_finding_boxes", "cli"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def head_features(model: Any, recipe: Any, cases_file: str | os.PathLike, split: str | None,
                  cache_dir: str | os.PathLike | None = None, batch_size: int = 8, progress: bool = True
                  ) -> dict[str, torch.Tensor]:
    """Every image of ``split`` (current scans and priors) -> ``{"hidden": (N, head_hidden)`` the findings
    head's features before its last layer, ``"finding_box": (N, S, 6)`` unit-grid targets, ``"finding_mask": (N,
    S)}``. Without ``cache_dir`` the preprocessed images go through a temporary cache, removed afterwards."""
    import tempfile

    from radfm3d.findings.pretraining import build_structured_dataset
    from radfm3d.utils import progress_bar

    trunk = model.reader.head.net[:-1]
    hidden, boxes, masks = [], [], []
    with tempfile.TemporaryDirectory(prefix="radfm3d-refit-") as scratch:
        dataset = build_structured_dataset(cases_file, recipe, scratch if cache_dir is None else cache_dir,
                                           model.reader.schema, split=split, include_priors=True)
        bar = progress_bar(len(dataset), enabled=progress, desc=f"features {Path(cases_file).parent.name}",
                           unit="scan")
        try:
            for start in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
                latents = model.get_visual_latents(torch.stack([item["image"] for item in items]))
                hidden.append(trunk(latents.float()))
                boxes += [item["label"]["finding_box"] for item in items]
                masks += [item["label"]["finding_mask"] for item in items]
                bar.update(len(items))
        finally:
            bar.close()
    if not hidden:
        from radfm3d.errors import RadFM3DInputError

        raise RadFM3DInputError(cases_file, f"no images in split {split!r}")
    return {"hidden": torch.cat(hidden), "finding_box": torch.stack(boxes), "finding_mask": torch.stack(masks)}


def _box_hit(weight: torch.Tensor, bias: torch.Tensor, data: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(hit@0.3, mean IoU) of the boxes from ``weight``/``bias`` over the labelled (image, structure) pairs."""
    from radfm3d.findings.box_snapping import box_iou

    pred = torch.sigmoid(data["hidden"] @ weight.T + bias).reshape(data["finding_box"].shape)
    iou = box_iou(pred, data["finding_box"])[data["finding_mask"] > 0]
    return float((iou >= 0.3).float().mean()), float(iou.mean())


def fit_finding_box_rows(weight: torch.Tensor, bias: torch.Tensor, train: dict[str, torch.Tensor],
                         val: dict[str, torch.Tensor], steps: int = 1000, learning_rate: float = 3e-4,
                         batch_size: int = 256, eval_every: int = 100, seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Adam on the box rows ``weight (S*6, hidden)``, ``bias (S*6,)`` from their current values; returns the rows of
    the step with the best validation hit@0.3 (the start counts, so the result is never worse on val) and a report
    with the before/after figures and the per-evaluation history."""
    from radfm3d.findings.box_snapping import box_iou

    generator = torch.Generator().manual_seed(int(seed))
    w, b = weight.detach().float().clone().requires_grad_(True), bias.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w, b], lr=float(learning_rate))
    start = {"train": _box_hit(w.detach(), b.detach(), train), "val": _box_hit(w.detach(), b.detach(), val)}
    best = (start["val"][0], 0, w.detach().clone(), b.detach().clone())
    history = []
    shape = train["finding_box"].shape[1:]
    for step in range(1, int(steps) + 1):
        idx = torch.randint(0, len(train["hidden"]), (int(batch_size),), generator=generator)
        pred = torch.sigmoid(train["hidden"][idx] @ w.T + b).reshape(len(idx), *shape)
        target, mask = train["finding_box"][idx], train["finding_mask"][idx] > 0
        if not bool(mask.any()):
            continue
        loss = (pred - target).abs().sum(-1)[mask].mean() + (1 - box_iou(pred, target))[mask].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % int(eval_every) == 0 or step == int(steps):
            hit, iou = _box_hit(w.detach(), b.detach(), val)
            history.append({"step": step, "loss": round(float(loss.detach()), 4), "val_hit@0.3": round(hit, 4),
                            "val_iou": round(iou, 4)})
            if hit > best[0]:
                best = (hit, step, w.detach().clone(), b.detach().clone())
    report = {"before": {k: {"hit@0.3": round(v[0], 4), "iou": round(v[1], 4)} for k, v in start.items()},
              "best_step": best[1], "history": history,
              "after": {k: dict(zip(("hit@0.3", "iou"), (round(x, 4) for x in _box_hit(best[2], best[3], d))))
                        for k, d in (("train", train), ("val", val))}}
    return best[2], best[3], report


def refit_finding_boxes(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        train: Sequence[tuple[str | os.PathLike, str | os.PathLike | None]],
                        val: tuple[str | os.PathLike, str | os.PathLike | None], train_split: str | None = "train",
                        val_split: str | None = "val", steps: int = 1000, learning_rate: float = 3e-4, seed: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """Write ``out_dir``: the model of ``model_dir`` with its findings head's finding-box rows re-fitted on
    the ``train_split`` images of each ``(cases.jsonl, cache folder or None)`` in ``train``, the step chosen on the
    ``val_split`` of ``val`` (None: every case); the report (also ``box_refit.json`` in ``out_dir``) has the figures."""
    from radfm3d.engine.training import load_processor
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.utils import atomic_write

    # the base LLM is not needed (nor loaded): only the encoder, the resampler and the head run, and the written
    # folder names the same base
    model = RadFM3DForCausalLM.from_pretrained(model_dir, load_text_weights=False).eval()
    if getattr(model, "reader", None) is None:
        raise RadFM3DInputError(model_dir, "this model has no findings reader, so there is no head to re-fit")
    if not model.reader.schema.has("finding_box"):
        raise RadFM3DInputError(model_dir, f"the label schema {model.reader.schema.name!r} has no finding boxes")
    processor = load_processor(model_dir)
    recipe = processor.recipe
    parts = [head_features(model, recipe, cases, train_split, cache, progress=progress) for cases, cache in train]
    train_data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    val_data = head_features(model, recipe, val[0], val_split, val[1], progress=progress)
    head = model.reader.head
    rows = head.finding_box_rows()
    last = head.net[-1]
    weight, bias, report = fit_finding_box_rows(last.weight[rows], last.bias[rows], train_data, val_data, steps,
                                                learning_rate, seed=seed)
    with torch.no_grad():
        last.weight[rows] = weight.to(last.weight.dtype)
        last.bias[rows] = bias.to(last.bias.dtype)
    report.update(train_images=len(train_data["hidden"]), val_images=len(val_data["hidden"]),
                  train=[str(c) for c, _ in train], val=str(val[0]), steps=int(steps), learning_rate=learning_rate)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    atomic_write(out / "box_refit.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    logger.info(f"finding boxes re-fitted: val hit@0.3 {report['before']['val']['hit@0.3']} -> "
                f"{report['after']['val']['hit@0.3']} (step {report['best_step']}): {out}")
    return report


def _source(text: str) -> tuple[str, str | None]:
    cases, _, cache = text.partition("=")
    return cases, (cache or None)


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d refit-boxes MODEL --train CASES[=CACHE] ... --val CASES[=CACHE] --out FOLDER``."""
    import argparse

    parser = argparse.ArgumentParser(prog="radfm3d refit-boxes", description=(
        "Re-fit the finding boxes of a findings model's head (the boxes box snapping writes into grounding "
        "answers) on more cases; the reading, the encoder and the LLM keep their exact weights."))
    parser.add_argument("model", help="findings model folder")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--train", action="append", required=True, metavar="CASES[=CACHE]",
                        help="cases.jsonl (structured labels) and, optionally, its preprocessed-image cache folder; "
                             "repeat for several sets")
    parser.add_argument("--val", required=True, metavar="CASES[=CACHE]", help="validation cases (choose the step)")
    parser.add_argument("--train-split", default="train", help="split of the --train cases (default train; 'all')")
    parser.add_argument("--val-split", default="val", help="split of the --val cases (default val; 'all')")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = refit_finding_boxes(args.model, args.out, [_source(t) for t in args.train], _source(args.val),
                                 *(None if split == "all" else split for split in (args.train_split, args.val_split)),
                                 args.steps, args.learning_rate, args.seed)
    print(json.dumps({k: report[k] for k in ("before", "after", "best_step", "train_images", "val_images")}))
    return 0
