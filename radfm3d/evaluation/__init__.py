# Copyright (c) radfm3d contributors. Apache-2.0.
"""Evaluation: metrics with bootstrap intervals, negation-aware findings, the harness, its report and the
anatomical slice figures.

    from radfm3d.evaluation import evaluate_predictions, evaluate_model, write_report
"""

from __future__ import annotations


from radfm3d.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "Figure": "radfm3d.evaluation.metrics",
    "bootstrap_figure": "radfm3d.evaluation.metrics",
    "normalize_answer": "radfm3d.evaluation.metrics",
    "box_iou_3d": "radfm3d.evaluation.metrics",
    "extract_findings": "radfm3d.evaluation.findings",
    "evaluate_predictions": "radfm3d.evaluation.harness",
    "evaluate_model": "radfm3d.evaluation.harness",
    "generate_predictions": "radfm3d.evaluation.harness",
    "run_model": "radfm3d.evaluation.harness",
    "read_predictions": "radfm3d.evaluation.harness",
    "oracle_predictions": "radfm3d.evaluation.harness",
    "constant_predictions": "radfm3d.evaluation.harness",
    "task_family": "radfm3d.evaluation.harness",
    "write_report": "radfm3d.evaluation.report",
    "anatomical_slices": "radfm3d.evaluation.figures",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("radfm3d.evaluation", _EXPORTS)
