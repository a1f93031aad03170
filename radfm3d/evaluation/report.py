# Copyright (c) radfm3d contributors. Apache-2.0.
"""Evaluation outputs: `results.json` (all figures), `report.md` (one table per task family) and PNG figures
(`task_bars.png`: headline figure per family, model vs blind with 95% intervals and chance;
`grounding_cases.png`: predicted and true boxes on the axial, coronal and sagittal planes of the original scan
through the true box centre, :mod:`radfm3d.evaluation.figures`). Every file is written atomically.

This module imports nothing from the harness (the harness imports it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from radfm3d.utils import atomic_savefig, atomic_write_json, atomic_write_text

HEADLINE = {"closed": ("accuracy",), "text": ("finding_f1", "rouge_l"), "grounding": ("hit@0.5", "iou")}
_MM_FIGURES = ("centre_error_mm",)


def _fmt(x: Any, name: str = "") -> str:
    if x is None:
        return "—"
    return f"{x:.1f}" if name in _MM_FIGURES else f"{x:.3f}"


def headline(fam: Mapping[str, Any]) -> str | None:
    """Name of the family's headline figure."""
    for name in HEADLINE[fam["kind"]]:
        if name in fam.get("figures", {}):
            return name
    return None


def markdown_report(results: Mapping[str, Any]) -> str:
    """Markdown: a summary, then per family a table | figure | value | 95% CI | blind | blind 95% CI | chance | n |."""
    meta = results["meta"]
    lines = [f"# Evaluation: {meta['name']}", "",
             f"{meta['n_records']} records; intervals: bootstrap {meta['bootstrap']['interval']} "
             f"({meta['bootstrap']['n_resamples']} resamples, seed {meta['bootstrap']['seed']}). "
             "Fractions in [0, 1] (BLEU-4 = sacrebleu / 100); centre error in mm in the original scan's world space.",
             ""]
    missing = {k: v for k, v in meta.get("missing_predictions", {}).items() if v}
    if missing:
        lines += [f"**Missing predictions** (scored as empty answers): {missing}", ""]
    failures = results.get("failures") or []
    if failures:
        lines += [f"## Failed records ({meta.get('failed_records', len(failures))}, not scored)", "",
                  "| id | run | problem |", "|---|---|---|"]
        lines += [f"| {f['id']} | {f.get('run', '')} | {str(f['problem']).replace('|', '/')} |" for f in failures]
        lines.append("")
    if results.get("summary"):
        lines += ["## Chance and image checks", ""] + [f"- {s}" for s in results["summary"]] + [""]
    for family, fam in results["families"].items():
        lines += [f"## {family} ({fam['kind']}, n={fam['n']}; tasks: {', '.join(fam['tasks'])})", ""]
        figs, blind = fam.get("figures", {}), fam.get("blind") or {}
        chance = fam.get("chance", {})
        lines += ["| figure | value | 95% CI | blind | blind 95% CI | chance | n |",
                  "|---|---|---|---|---|---|---|"]
        for name, f in figs.items():
            b = blind.get(name)
            ch = chance.get("level") if name.startswith("accuracy") else None
            bl = (_fmt(b["value"], name), f"[{_fmt(b['low'], name)}, {_fmt(b['high'], name)}]") if b else ("—", "—")
            lines.append(f"| {name} | {_fmt(f['value'], name)} | [{_fmt(f['low'], name)}, {_fmt(f['high'], name)}] "
                         f"| {bl[0]} | {bl[1]} | {_fmt(ch)} | {f['n']} |")
        if chance:
            lines += ["", f"Chance: uniform over choices {_fmt(chance.get('uniform'))}, majority answer "
                          f"({chance.get('majority_source')}) {_fmt(chance.get('majority'))}."]
            for run, flags in fam.get("near_chance", {}).items():
                if flags.get("accuracy") is not None:
                    lines.append(f"The {run} run is **{'near chance' if flags['accuracy'] else 'above chance'}** "
                                 "(accuracy interval " + ("reaches" if flags["accuracy"] else "stays above")
                                 + " the chance level).")
        gain = fam.get("image_gain")
        if gain:
            lines += ["", f"Image gain (blind answer NLL - model answer NLL, nats per answer token, paired; > 0: the "
                          f"reference answer is likelier with the real image): {_fmt(gain['value'])} "
                          f"[{_fmt(gain['low'])}, {_fmt(gain['high'])}], n={gain['n']}."]
        for note in fam.get("notes", [])[:10]:
            lines.append(f"- note: {note}")
        lines.append("")
    return "\n".join(lines)


def plot_task_bars(results: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Bar chart: headline figure per family, model vs blind, 95% interval whiskers, chance ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(fam_name, fam, headline(fam)) for fam_name, fam in results["families"].items()]
    rows = [r for r in rows if r[2] is not None]
    if not rows:
        return None
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.5))
    for offset, run, color in ((-0.2, "figures", "tab:blue"), (0.2, "blind", "tab:gray")):
        vals, errs = [], [[], []]
        for _, fam, name in rows:
            f = (fam.get(run) or {}).get(name)
            v = np.nan if f is None or f["value"] is None else f["value"]
            vals.append(v)
            errs[0].append(0 if f is None or f["low"] is None else max(v - f["low"], 0))
            errs[1].append(0 if f is None or f["high"] is None else max(f["high"] - v, 0))
        label = results["meta"]["name"] if run == "figures" else "blind baseline"
        ax.bar(x + offset, np.nan_to_num(vals), 0.4, yerr=errs, capsize=3, color=color, label=label)
    for i, (_, fam, _) in enumerate(rows):
        level = fam.get("chance", {}).get("level")
        if level is not None:
            ax.hlines(level, i - 0.4, i + 0.4, colors="tab:red", linestyles="--",
                      label="chance" if i == min(j for j, r in enumerate(rows) if r[1].get("chance")) else None)
    ax.set_xticks(x, [f"{fam_name}\n({name})" for fam_name, _, name in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95% bootstrap interval)")
    ax.legend(fontsize=8)
    ax.set_title(f"{results['meta']['name']}: headline figure per task family")
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=110)
    finally:
        plt.close(fig)


def plot_grounding_cases(
    cases: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]], path: str | os.PathLike,
    n_cases: int = 4,
) -> Path | None:
    """Per case, the axial, coronal and sagittal planes of the original scan (first image, channel 0) through the
    true box centre, cut in world RAS mm and shown in the radiological convention with R/L, A/P, S/I markers
    (:func:`radfm3d.evaluation.figures.draw_slice_plane`); true box green, predicted box red. Cases whose scan
    cannot be read are skipped. Returns None when no case has both a true box and a readable image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radfm3d.evaluation.figures import anatomical_slices, draw_slice_plane
    from radfm3d.io import load_image

    from radfm3d.errors import RadFM3DInputError

    by_id = {str(r["id"]): r for r in records}
    chosen = []
    for case in cases:
        if len(chosen) == n_cases:
            break
        images = by_id.get(str(case["id"]), {}).get("images")
        if not case.get("true_boxes_world_mm") or not images:
            continue
        try:  # a case whose scan cannot be read is left out; the others are drawn
            chosen.append((case, load_image(images[0])))
        except (RadFM3DInputError, OSError):
            continue
    if not chosen:
        return None
    fig, axes = plt.subplots(len(chosen), 3, figsize=(10.5, 3.5 * len(chosen)), squeeze=False)
    for row, (case, image) in zip(axes, chosen):
        vol = np.asarray(image[0], dtype=np.float32)
        true = np.asarray(case["true_boxes_world_mm"][0], dtype=np.float64)
        preds = [np.asarray(b, dtype=np.float64) for b in case.get("pred_boxes_world_mm") or []][:1]
        lo, hi = np.percentile(vol, [1, 99])
        planes = anatomical_slices(vol, np.asarray(image.affine, dtype=np.float64), (true[:3] + true[3:]) / 2)
        for ax, plane in zip(row, planes):
            draw_slice_plane(ax, plane, [true, *preds], colors=["lime"] + ["red"] * len(preds), vmin=lo, vmax=hi,
                             title=f"{case['id']} {plane.name}  IoU={case.get('iou', 0):.2f}")
    fig.suptitle("grounding: true box (green), predicted box (red)", fontsize=9)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=100)
    finally:
        plt.close(fig)


def write_report(
    results: Mapping[str, Any], out_dir: str | os.PathLike, *, records: Sequence[Mapping[str, Any]] | None = None,
    predictions: Mapping[str, Any] | None = None, n_cases: int = 4,
) -> dict[str, Path]:
    """Write results.json, report.md, task_bars.png and (when images load) grounding_cases.png -> their paths.

    ``predictions`` is not needed (the cases in ``results`` carry them) and is accepted for callers that pass it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    data = {k: v for k, v in results.items() if k not in ("predictions", "blind_predictions")}
    paths["json"] = atomic_write_json(out / "results.json", data)
    paths["markdown"] = out / "report.md"
    md = markdown_report(results)
    bars = plot_task_bars(results, out / "task_bars.png")
    if bars is not None:
        paths["bars"] = bars
        md += "\n![headline figure per task family](task_bars.png)\n"
    cases = results.get("cases", {}).get("grounding") or []
    if records is not None and cases:
        try:
            drawn = plot_grounding_cases(cases, records, out / "grounding_cases.png", n_cases=n_cases)
        except Exception as err:  # drawing is a courtesy; a broken image must not lose the figures
            md += f"\n(grounding cases not drawn: {type(err).__name__}: {err})\n"
            drawn = None
        if drawn is not None:
            paths["grounding_cases"] = drawn
            md += "\n![grounding cases](grounding_cases.png)\n"
    atomic_write_text(paths["markdown"], md)
    return paths
