# Copyright (c) radfm3d contributors. Apache-2.0.
"""Findings room: the structured-findings reader of a 3D VLM, for any label schema.

- :mod:`~radfm3d.findings.schema`: the label schema as data (``label_schema.json``).
- :mod:`~radfm3d.findings.labels`: a case's structured labels as tensors.
- :mod:`~radfm3d.findings.heads`: the findings head and the stage-0 wrapper.
- :mod:`~radfm3d.findings.pretraining`: stage-0 training (bundle ``pretrain_vision.json``).
- :mod:`~radfm3d.findings.reader` / :mod:`~radfm3d.findings.model`: the reading and ``RadFM3DFindingsModel``.
- :mod:`~radfm3d.findings.attach`: ``radfm3d findings-prompt`` / ``findings-migrate``.
- :mod:`~radfm3d.findings.box_snapping`, :mod:`~radfm3d.findings.box_refit`: grounding boxes from the head.
- :mod:`~radfm3d.findings.thresholds`: ``radfm3d reading-threshold``.
"""

from __future__ import annotations

from radfm3d.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "LabelSchema": "radfm3d.findings.schema",
    "load_schema": "radfm3d.findings.schema",
    "labels_for_image": "radfm3d.findings.labels",
    "structured_records": "radfm3d.findings.labels",
    "StructuredFindingsHead": "radfm3d.findings.heads",
    "VisionPretrainingModel": "radfm3d.findings.heads",
    "FindingsReader": "radfm3d.findings.reader",
    "RadFM3DFindingsConfig": "radfm3d.findings.model",
    "RadFM3DFindingsModel": "radfm3d.findings.model",
    "attach_reader": "radfm3d.findings.model",
    "migrate_config": "radfm3d.findings.model",
    "attach_findings_prompt": "radfm3d.findings.attach",
    "snap_box": "radfm3d.findings.box_snapping",
    "snap_text": "radfm3d.findings.box_snapping",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("radfm3d.findings", _EXPORTS)
