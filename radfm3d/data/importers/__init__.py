# Copyright (c) radfm3d contributors. Apache-2.0.
"""Importers: datasets and hospital exports -> validated JSONL manifests (``radfm3d import <format> ...``).

Every importer writes ``<split>.jsonl`` manifests (``manifest.jsonl`` without a split), ``import_report.json`` and
``report.md`` into ``--out``; bad rows and files are reported and skipped, never fatal; per-item work is resumable
(:mod:`radfm3d.data.importers.common`).

=====================  ==================================================================================
format                 module
=====================  ==================================================================================
``dicom-export``       ``dicom_export``: patient/study/series or flat DICOM export folders (headers only)
``ct-rate``            ``ct_rate``: CT-RATE volumes, reports, 18 labels and metadata
``radgenome-chestct``  ``radgenome``: RadGenome-ChestCT region sentences with their region masks
``m3d-cap``            ``m3d``: M3D-Cap JSON of .npy arrays and report texts
``m3d-vqa``            ``m3d``: M3D-VQA CSVs (closed A-D and open questions)
``csv``                ``csv_table``: a CSV/TSV with an image-path column and text columns
=====================  ==================================================================================
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["IMPORTERS", "cli"]

#: format -> (module:function, one-line description)
IMPORTERS: dict[str, tuple[str, str]] = {
    "dicom-export": ("radfm3d.data.importers.dicom_export:cli",
                     "a hospital DICOM export (nested or flat) -> one record per study, series described"),
    "ct-rate": ("radfm3d.data.importers.ct_rate:cli",
                "CT-RATE chest CT: reports, per-abnormality questions, 18 labels; geometry/HU fixed from metadata"),
    "radgenome-chestct": ("radfm3d.data.importers.radgenome:cli",
                          "RadGenome-ChestCT region sentences + masks -> structure records with world-mm boxes"),
    "m3d-cap": ("radfm3d.data.importers.m3d:cli_cap", "M3D-Cap image-report pairs (resized arrays, no spacing)"),
    "m3d-vqa": ("radfm3d.data.importers.m3d:cli_vqa", "M3D-VQA closed (A-D) and open questions (no spacing)"),
    "csv": ("radfm3d.data.importers.csv_table:cli", "a CSV/TSV with an image-path column and text columns"),
}


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d import <format> ...```: dispatch to the format's importer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: radfm3d import <format> --out DIR [options]\n\nformats:")
        for name, (_, desc) in IMPORTERS.items():
            print(f"  {name:<14} {desc}")
        print("\n`radfm3d import <format> --help` shows a format's options.")
        return 0
    if argv[0] not in IMPORTERS:
        print(f"radfm3d import: unknown format {argv[0]!r}; known: {', '.join(IMPORTERS)}", file=sys.stderr)
        return 2
    module_name, func_name = IMPORTERS[argv[0]][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(argv[1:]) or 0)
