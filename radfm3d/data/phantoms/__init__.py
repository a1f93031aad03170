# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadPhantom: a deterministic generator of synthetic CT/MRI scans with known findings (one dataset among others).

Spec: ``shared/design/PHANTOM_BENCHMARK.md``. The package is split by job; each module imports only those above
it in this list, and this file re-exports the public names::

    anatomy.py    tables: regions, organs, tissues, finding types and sites, the anatomy layout; Ellipsoid
    render.py     sampling a case (geometry, anatomy, findings, prior) and rendering volumes; render_case
    tasks.py      task records (manifest lines with varied phrasings) built from a case's ground truth
    writers.py    NIfTI / DICOM / sidecar / manifest writers (atomic, byte-identical for a seed)
    generate.py   generate_phantoms (parallel, resumable, failures recorded) and the ``radfm3d phantoms`` CLI

Public API::

    scan, prior, gt = render_case(seed, index)          # PhantomScan(s) + JSON-able ground truth
    scans, gt = render_study(seed, index)               # one anatomy as CT, MR T1, MR T2 (a multi-series study)
    image, gt = make_case(seed, index)                  # MetaTensor (1, X, Y, Z) + ground truth
    summary = generate_phantoms(out_dir, n, seed)       # files + train/val/test.jsonl + cases.jsonl
    radfm3d phantoms --n 2000 --out DIR --seed 0 --workers 2 [--studies 200]
"""

from __future__ import annotations

from radfm3d.data.phantoms.anatomy import _ANATOMY  # noqa: F401 - imported by radfm3d.data.structured_labels
from radfm3d.data.phantoms.anatomy import (
    ANATOMY, CHANGES, FINDING_SITES, FINDING_SIZE_MM, FINDING_TYPES, GENERATOR_VERSION, ORGANS,
    REGION_FINDING_ORGANS, REGIONS, SIDES, SPLITS, TISSUES, Ellipsoid, organ_label,
)
from radfm3d.data.phantoms.generate import (
    PhantomGenerationError, cli, generate_case_files, generate_phantoms, generate_study_files,
)
from radfm3d.data.phantoms.render import (
    STUDY_SERIES, Acquisition, PhantomScan, format_box_text, grid_box_to_0_99, make_case, render_case, render_scan,
    render_study, sample_acquisition, split_of, study_split_of,
)
from radfm3d.data.phantoms.tasks import STUDY_TASKS, TASKS, build_records, build_study_records

__all__ = [
    "GENERATOR_VERSION",
    "REGIONS",
    "FINDING_TYPES",
    "ORGANS",
    "SIDES",
    "CHANGES",
    "SPLITS",
    "TISSUES",
    "FINDING_SITES",
    "FINDING_SIZE_MM",
    "REGION_FINDING_ORGANS",
    "ANATOMY",
    "Ellipsoid",
    "organ_label",
    "Acquisition",
    "PhantomScan",
    "sample_acquisition",
    "render_scan",
    "render_case",
    "render_study",
    "STUDY_SERIES",
    "study_split_of",
    "make_case",
    "split_of",
    "grid_box_to_0_99",
    "format_box_text",
    "TASKS",
    "build_records",
    "STUDY_TASKS",
    "build_study_records",
    "generate_study_files",
    "generate_phantoms",
    "generate_case_files",
    "PhantomGenerationError",
    "cli",
]
