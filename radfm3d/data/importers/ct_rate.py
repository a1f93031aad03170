# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import ct-rate``: the CT-RATE chest CT dataset (Hamamci et al.) -> report, VQA and label records.

Layout read (as published on the dataset card; ``--root`` is the folder holding ``dataset/`` or ``dataset`` itself)::

    dataset/{train,valid}[_fixed]/<split>_<patient>/<split>_<patient>_<scan>/<split>_<patient>_<scan>_<recon>.nii.gz
    dataset/metadata/{train,validation}_metadata.csv            VolumeName, XYSpacing "[x, y]", ZSpacing,
                                                                RescaleSlope, RescaleIntercept, ... (one row/volume)
    dataset/radiology_text_reports/{train,validation}_reports.csv   VolumeName, ClinicalInformation_EN,
                                                                Technique_EN, Findings_EN, Impressions_EN
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 abnormality columns

Per volume: a ``report`` record (findings + impression as the answer; the clinical information in the prompt), one
closed ``vqa_presence`` record per abnormality (choices Yes./No.), and the 18 labels as the record's ``labels``
(0 / 1 per abnormality, schema ``ct-rate``: :data:`CT_RATE_ABNORMALITIES`), written as ``label_schema.json``
(a radfm3d label schema of per-scan flags) with ``cases.jsonl`` (one line per volume) for stage-0 training. ``patient_id`` / ``study_id`` carry
the patient and scan keys. Geometry and HU come from the metadata row where the NIfTI header disagrees with it or
lacks it: the record's ``image_meta`` then carries ``spacing_mm``, ``hu_rescale`` or ``stored_to_hu``
(:mod:`radfm3d.data.image_meta`), and the import report names each such volume. Only NIfTI headers are read.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from radfm3d.data.importers.common import (ImportReport, ItemState, check_out_dir, parse_splits, relative_image_path,
                                           write_split_manifests)
from radfm3d.data.importers.table_index import TableIndex, stream_csv
from radfm3d.errors import RadFM3DInputError
from radfm3d.utils import atomic_write, progress_bar

__all__ = ["CT_RATE_ABNORMALITIES", "import_ct_rate", "label_schema", "volume_path", "cli"]

#: the 18 multi-abnormality label columns of CT-RATE, in the dataset's order
CT_RATE_ABNORMALITIES: tuple[str, ...] = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening")
_TABLE_PREFIXES = {"train": ("train",), "valid": ("validation", "valid")}
_YES, _NO = "Yes.", "No."


def _dataset_dir(root: Path) -> Path:
    for candidate in (root / "dataset", root):
        if (candidate / "metadata").is_dir() or (candidate / "radiology_text_reports").is_dir():
            return candidate
    raise RadFM3DInputError(root, "not a CT-RATE folder: expected dataset/metadata and dataset/radiology_text_reports "
                                  "below it")


def _table(folder: Path, split: str, suffix: str) -> Path:
    for prefix in _TABLE_PREFIXES[split]:
        path = folder / f"{prefix}_{suffix}.csv"
        if path.is_file():
            return path
    raise RadFM3DInputError(folder, f"no {' or '.join(p + '_' + suffix + '.csv' for p in _TABLE_PREFIXES[split])}")


def volume_path(dataset: Path, name: str, fixed: bool) -> Path:
    """``train_2_a_1.nii.gz`` -> ``dataset/train[_fixed]/train_2/train_2_a/train_2_a_1.nii.gz``."""
    parts = name.split("_")
    if len(parts) < 4 or not name.endswith(".nii.gz"):
        raise ValueError(f"volume name {name!r} is not <split>_<patient>_<scan>_<recon>.nii.gz")
    split_dir = parts[0] + ("_fixed" if fixed else "")
    patient, scan = f"{parts[0]}_{parts[1]}", f"{parts[0]}_{parts[1]}_{parts[2]}"
    return dataset / split_dir / patient / scan / name


def _floats(text: Any, n: int) -> list[float] | None:
    """``"[0.75, 0.75]"`` / ``"0.75"`` -> floats (None when absent or not numbers)."""
    if text is None or str(text).strip() in ("", "nan", "None"):
        return None
    try:
        value = ast.literal_eval(str(text).strip())
    except (ValueError, SyntaxError):
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _geometry_fixes(path: Path, meta: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(``image_meta`` overrides, notes) from the NIfTI header against the metadata row (header read only)."""
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
    except Exception as err:  # nibabel raises many types on broken files
        raise RadFM3DInputError(path, f"unreadable NIfTI header ({type(err).__name__}: {err})") from None
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    xy, z = _floats(meta.get("XYSpacing"), 2), _floats(meta.get("ZSpacing"), 1)
    zooms = [float(v) for v in header.get_zooms()[:3]]
    if xy and z:
        wanted = [xy[0], xy[1], z[0]]
        if any(abs(a - b) > 1e-3 * max(1.0, abs(b)) for a, b in zip(zooms, wanted)):
            overrides["spacing_mm"] = wanted
            notes.append(f"header spacing {[round(v, 4) for v in zooms]} mm disagrees with the metadata's "
                         f"{wanted} mm: the metadata's is used")
    else:
        notes.append("metadata has no usable XYSpacing/ZSpacing: the header's spacing is used")
    slope, intercept = _floats(meta.get("RescaleSlope"), 1), _floats(meta.get("RescaleIntercept"), 1)
    h_slope, h_inter = header.get_slope_inter()
    if slope and intercept:
        m_slope, m_inter = slope[0], intercept[0]
        if h_slope is not None and math.isfinite(h_slope) and h_slope != 0:
            hi = 0.0 if h_inter is None or not math.isfinite(h_inter) else float(h_inter)
            if abs(h_slope - m_slope) > 1e-6 or abs(hi - m_inter) > 1e-6:
                # the header gives v = hs * raw + hi; HU = m_slope * raw + m_inter = a * v + b
                a = m_slope / float(h_slope)
                overrides["hu_rescale"] = [a, m_inter - a * hi]
                notes.append(f"header rescale (slope {h_slope:g}, intercept {hi:g}) differs from the metadata's "
                             f"(slope {m_slope:g}, intercept {m_inter:g}): HU from the metadata")
        elif abs(m_slope - 1.0) > 1e-6 or abs(m_inter) > 1e-6:
            overrides["stored_to_hu"] = [m_slope, m_inter]
            notes.append(f"header has no rescale; the metadata's (slope {m_slope:g}, intercept {m_inter:g}) is "
                         "applied at load time when the values read are stored values (none below 0)")
    return overrides, notes


def _report_answer(report_row: Mapping[str, Any]) -> str:
    findings = (report_row.get("Findings_EN") or "").strip()
    impression = (report_row.get("Impressions_EN") or "").strip()
    parts = ([f"Findings: {findings}"] if findings else []) + ([f"Impression: {impression}"] if impression else [])
    return " ".join(parts)


def _records_for(name: str, image: str, labels_row: Mapping[str, Any] | None, report_row: Mapping[str, Any] | None,
                 overrides: Mapping[str, Any], vqa: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, problems) of one volume."""
    parts = name[: -len(".nii.gz")].split("_")
    base = {"images": [image], "modality": "CT", "region": "chest", "patient_id": f"{parts[0]}_{parts[1]}",
            "study_id": f"{parts[0]}_{parts[1]}_{parts[2]}", "source": {"dataset": "CT-RATE", "volume": name}}
    if overrides:
        base["image_meta"] = [dict(overrides)]
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    labels: dict[str, int] | None = None
    if labels_row is not None:
        labels = {}
        for label in CT_RATE_ABNORMALITIES:
            value = str(labels_row.get(label, "")).strip()
            if value not in ("0", "1", "0.0", "1.0"):
                problems.append(f"label {label!r} is {value!r}, not 0/1")
                labels = None
                break
            labels[label] = int(float(value))
    answer = _report_answer(report_row) if report_row is not None else ""
    if answer:
        clinical = (report_row.get("ClinicalInformation_EN") or "").strip() if report_row else ""
        context = f" Clinical information: {clinical}" if clinical and clinical.lower() != "not given." else ""
        record = {**base, "id": f"{name}-report", "task": "report", "answer": answer,
                  "prompt": f"<image>{context} Write the findings and impression of this chest CT report."}
        if labels is not None:
            record["labels"] = dict(labels)
        records.append(record)
    elif report_row is None:
        problems.append("no row in the reports CSV")
    else:
        problems.append("empty findings and impression in the reports CSV")
    if vqa and labels is not None:
        for label, value in labels.items():
            records.append({**base, "id": f"{name}-vqa-{label.lower().replace(' ', '_')}", "task": "vqa_presence",
                            "prompt": f"<image> Is there {label.lower()} in this chest CT scan?",
                            "answer": _YES if value else _NO, "choices": [_YES, _NO],
                            "labels": {label: value}})
    elif labels_row is None:
        problems.append("no row in the abnormality labels CSV")
    return records, problems


def label_schema() -> dict[str, Any]:
    """CT-RATE's 18 abnormalities as a radfm3d label schema (per-scan flags only: no organs, no boxes), the file
    :mod:`radfm3d.findings` trains and reads with (``radfm3d.findings.schema.load_schema``)."""
    return {"format": "radfm3d-label-schema", "version": 1, "name": "ct-rate",
            "description": "CT-RATE's 18 multi-abnormality labels (predicted from the reports by the dataset's "
                           "authors) as per-scan flags.",
            "outputs": ["flags"],
            "flags": [{"name": label, "phrase": f" {label.lower()}"} for label in CT_RATE_ABNORMALITIES]}


def _write_cases(out_dir: Path, splits: Sequence[str]) -> None:
    """``cases.jsonl`` for stage-0 training on the flags: one line per volume with labels, from the manifests'
    report records (``id``, ``split``, ``images.image`` relative to ``out_dir``, ``flags``: the positive labels)."""
    from radfm3d.data.manifest import iter_jsonl
    from radfm3d.utils import atomic_write as write

    lines: list[str] = []
    for split in splits:
        manifest = out_dir / f"{split}.jsonl"
        if not manifest.is_file():
            continue
        for _, record in iter_jsonl(manifest):
            labels = record.get("labels")
            if record.get("task") != "report" or not labels:
                continue
            case = {"id": record["source"]["volume"], "split": split, "modality": "CT",
                    "images": {"image": record["images"][0]},
                    "flags": [name for name, value in labels.items() if value]}
            if record.get("image_meta"):
                case["image_meta"] = record["image_meta"][0]
            lines.append(json.dumps(case) + "\n")
    write(out_dir / "cases.jsonl", lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"))


def import_ct_rate(root: str | os.PathLike, out: str | os.PathLike, *, splits: Sequence[str] = ("train", "valid"),
                   volumes: str = "auto", vqa: bool = True, progress: bool = True) -> ImportReport:
    """Import CT-RATE; writes ``train.jsonl`` / ``valid.jsonl``, ``label_schema.json`` and the import report.

    Args:
        root: the downloaded dataset (the folder holding ``dataset/``, or ``dataset`` itself).
        out: output folder.
        splits: CT-RATE splits to import (``train``, ``valid``; ``valid`` is the usual held-out test set).
        volumes: ``fixed`` (``<split>_fixed`` folders, corrected headers), ``original`` or ``auto`` (fixed where
            present).
        vqa: also write one closed presence question per abnormality.
    """
    dataset, out_dir = _dataset_dir(Path(root)), check_out_dir(out)
    if volumes not in ("auto", "fixed", "original"):
        raise ValueError(f"volumes must be auto, fixed or original, got {volumes!r}")
    report = ImportReport("ct-rate", dataset, {"splits": list(splits), "volumes": volumes, "vqa": vqa})
    index = TableIndex(out_dir / ".import_state" / "ct_rate_tables.sqlite")
    state = ItemState(out_dir, "ct_rate_volumes")
    prevalence = {split: {label: 0 for label in CT_RATE_ABNORMALITIES} for split in splits}
    volumes_per_split = {split: 0 for split in splits}

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for split in splits:
            if split not in _TABLE_PREFIXES:
                raise ValueError(f"unknown CT-RATE split {split!r} (train or valid)")
            metadata = _table(dataset / "metadata", split, "metadata")
            index.load(f"{split}_reports", _table(dataset / "radiology_text_reports", split, "reports"), "VolumeName")
            index.load(f"{split}_labels", _table(dataset / "multi_abnormality_labels", split, "predicted_labels"),
                       "VolumeName")
            for table in (f"{split}_reports", f"{split}_labels"):
                for row_number, key in index.duplicates.get(table, []):
                    report.note(f"{table}.csv:row {row_number}", f"second row for {key}; the first is used")
            fixed = volumes == "fixed" or (volumes == "auto" and (dataset / f"{split}_fixed").is_dir())
            with open(metadata, "rb") as fh:
                total = max(0, sum(1 for _ in fh) - 1)
            bar = progress_bar(total, enabled=progress, desc=f"CT-RATE {split}", unit="volume")
            try:
                for row_number, meta in stream_csv(metadata, ("VolumeName",)):
                    bar.update(1)
                    yield from _volume(split, row_number, metadata.name, meta, fixed)
            finally:
                bar.close()

    def _volume(split: str, row_number: int, table: str, meta: Mapping[str, Any], fixed: bool
                ) -> Iterator[tuple[str, dict[str, Any]]]:
        name = (meta.get("VolumeName") or "").strip()
        where = f"{table}:row {row_number}"
        try:
            path = volume_path(dataset, name, fixed)
            st = path.stat()
        except ValueError as err:
            report.skip(where, str(err))
            return
        except OSError:
            report.skip(where, f"volume not found: {volume_path(dataset, name, fixed)}")
            return
        key = f"{name}|{st.st_size}|{st.st_mtime_ns}|{vqa}"
        done = state.get(key)
        if done is None:
            try:
                overrides, notes = _geometry_fixes(path, meta)
            except RadFM3DInputError as err:
                done = {"skip": err.problem}
            else:
                made, problems = _records_for(name, relative_image_path(path, out_dir),
                                              index.get(f"{split}_labels", name),
                                              index.get(f"{split}_reports", name), overrides, vqa)
                done = {"records": made, "problems": problems, "notes": notes}
            state.put(key, done)
        if "skip" in done:
            report.skip(where, done["skip"])
            return
        for note in done["notes"]:
            report.note(name, note)
        for problem in done["problems"]:
            report.skip(f"{where} ({name})", problem)
        volumes_per_split[split] += 1
        for record in done["records"]:
            if record["task"] == "report":
                for label, value in (record.get("labels") or {}).items():
                    prevalence[split][label] += value
            yield split, record

    try:
        write_split_manifests(records(), out_dir, report)
    finally:
        state.close()
        index.close()
    atomic_write(out_dir / "label_schema.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(label_schema(), indent=1) + "\n"))
    _write_cases(out_dir, splits)
    report.extra["volumes"] = volumes_per_split
    report.extra["label_prevalence"] = {
        split: {label: round(n / max(1, volumes_per_split[split]), 4) for label, n in labels.items()}
        for split, labels in prevalence.items()}
    report.extra["geometry_fixes"] = sum(1 for n in report.notes if "metadata" in n["message"])
    report.write(out_dir)
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d import ct-rate --root CT-RATE --out DIR [--split train,valid] [--volumes auto]``."""
    parser = argparse.ArgumentParser(prog="radfm3d import ct-rate", description=(
        "Import CT-RATE (volumes, reports, 18 abnormality labels, metadata) into train.jsonl / valid.jsonl: report "
        "records, per-abnormality closed questions and the 18 labels as each record's labels; geometry and HU fixed "
        "from the metadata where the NIfTI header disagrees (listed in the import report). Headers only; resumable."))
    parser.add_argument("--root", required=True, help="the downloaded CT-RATE folder (holding dataset/)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="train,valid", help="CT-RATE splits to import (default train,valid)")
    parser.add_argument("--volumes", choices=("auto", "fixed", "original"), default="auto",
                        help="read <split>_fixed volume folders (auto: where present)")
    parser.add_argument("--no-vqa", action="store_true", help="no per-abnormality questions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    splits = parse_splits(parser, args.split, _TABLE_PREFIXES, "CT-RATE")
    report = import_ct_rate(args.root, args.out, splits=splits, volumes=args.volumes, vqa=not args.no_vqa,
                            progress=not args.no_progress)
    print(f"radfm3d import ct-rate: {report.summary_line()}; report: {Path(args.out) / 'report.md'}",
          file=sys.stderr)
    return 0
