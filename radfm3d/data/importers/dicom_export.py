# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import dicom-export``: a hospital DICOM export folder -> one manifest record per study.

The export may be nested (patient/study/series folders) or flat (every file in one folder, series mixed). Only
headers are read (``pydicom.dcmread(stop_before_pixels=True)``); pixel data is decoded later, when a scan is used.
Files are grouped by StudyInstanceUID, then SeriesInstanceUID; each series is described (modality, body part,
description, orientation from ImageOrientationPatient, image count, in-plane and slice spacing in mm). Localizers,
non-image objects (SR, PR, KO, RTSTRUCT, SEG ...) and unreadable files are left out and listed in the import report.

A record names each series by its folder; where that folder holds other series too, ``image_series`` (one
SeriesInstanceUID per image, ``None`` where the folder holds only that series) says which one to read
(``radfm3d.io.load_image(folder, series_uid=...)``). An optional reports CSV, keyed by AccessionNumber or
StudyInstanceUID, gives the answer of a ``report`` record; studies without a report get an inference-only record.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from radfm3d.data.importers.common import (ImportReport, ItemState, check_out_dir, parse_fractions, relative_image_path,
                                           split_of, write_split_manifests)
from radfm3d.errors import RadFM3DInputError
from radfm3d.utils import progress_bar

__all__ = ["scan_export", "import_dicom_export", "describe_series", "cli"]

_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "PatientID", "AccessionNumber", "StudyDate",
         "StudyDescription", "Modality", "BodyPartExamined", "SeriesDescription", "SeriesNumber",
         "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
         "NumberOfFrames", "ImageType")
#: modalities that are images a radfm3d model reads
IMAGE_MODALITIES = ("CT", "MR", "PT", "CR", "DX", "MG", "XA", "RF", "US", "NM", "OT")
#: default bounds of the folder walk
MAX_FILES = 500_000
MAX_DEPTH = 16


def _walk(root: Path, max_files: int, max_depth: int) -> list[Path]:
    """Every candidate file under ``root`` (hidden files and DICOMDIR left out), bounded in count and depth."""
    found: list[Path] = []
    root_depth = len(root.parts)
    for folder, dirs, files in os.walk(root, followlinks=False):
        depth = len(Path(folder).parts) - root_depth
        if depth > max_depth:
            raise RadFM3DInputError(root, f"folders nest deeper than {max_depth} levels below the export root "
                                          f"(e.g. {folder}); pass --max-depth to allow more")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            found.append(Path(folder) / name)
            if len(found) > max_files:
                raise RadFM3DInputError(root, f"more than {max_files} files below the export root; pass "
                                              "--max-files to allow more, or import one part at a time")
    return found


def _json_value(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        return [_json_value(v) for v in value]
    if isinstance(value, (int, float)):
        return value
    return str(value)


def read_header(path: Path) -> dict[str, Any]:
    """The grouping/description tags of one file (no pixel data), or ``{"error": problem}``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if path.stat().st_size == 0:
            return {"error": "empty file"}
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=list(_TAGS))
    except InvalidDicomError:
        return {"error": "not a DICOM file"}
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as err:  # pydicom on broken files
        return {"error": f"unreadable DICOM header ({type(err).__name__}: {err})"[:300]}
    header = {tag: _json_value(ds.get(tag)) for tag in _TAGS if ds.get(tag) not in (None, "")}
    if "StudyInstanceUID" not in header or "SeriesInstanceUID" not in header:
        return {"error": "DICOM file without StudyInstanceUID/SeriesInstanceUID"}
    return header


def _orientation(iop: Sequence[float] | None) -> tuple[str, np.ndarray | None]:
    """Plane name from ImageOrientationPatient (axial / coronal / sagittal / oblique) and the slice normal (LPS)."""
    if iop is None or len(iop) != 6:
        return "unknown", None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return "unknown", None
    normal /= norm
    axis = int(np.argmax(np.abs(normal)))
    plane = ("sagittal", "coronal", "axial")[axis]  # LPS: x = L (sagittal normal), y = P (coronal), z = S (axial)
    if abs(normal[axis]) < 0.95:
        plane = f"oblique (nearest {plane})"
    return plane, normal


def describe_series(headers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A series described from its files' headers: modality, body part, description, orientation, spacing (mm)."""
    first = headers[0]
    plane, normal = _orientation(first.get("ImageOrientationPatient"))
    frames = sum(int(h.get("NumberOfFrames") or 1) for h in headers)
    info: dict[str, Any] = {
        "series_uid": first["SeriesInstanceUID"], "modality": first.get("Modality", "unknown"),
        "body_part": first.get("BodyPartExamined"), "description": first.get("SeriesDescription", ""),
        "series_number": first.get("SeriesNumber"), "orientation": plane, "files": len(headers), "images": frames,
        "rows": first.get("Rows"), "columns": first.get("Columns")}
    spacing = first.get("PixelSpacing")
    if spacing and len(spacing) == 2:
        info["pixel_spacing_mm"] = [float(spacing[0]), float(spacing[1])]
    if first.get("SliceThickness") is not None:
        info["slice_thickness_mm"] = float(first["SliceThickness"])
    if normal is not None and len(headers) > 1:
        positions = [h.get("ImagePositionPatient") for h in headers]
        if all(p is not None and len(p) == 3 for p in positions):
            along = np.sort(np.asarray(positions, float) @ normal)
            steps = np.diff(along)
            if len(steps) and float(np.median(steps)) > 0:
                step = float(np.median(steps))
                info["slice_spacing_mm"] = round(step, 4)
                info["extent_mm"] = round(float(along[-1] - along[0]) + step, 2)
                irregular = int(np.sum(np.abs(steps - step) > 0.1 * step))
                if irregular:
                    info["irregular_slice_gaps"] = irregular
    return info


def _is_localizer(header: Mapping[str, Any]) -> bool:
    image_type = header.get("ImageType") or []
    image_type = [image_type] if isinstance(image_type, str) else image_type
    return any(str(v).upper() == "LOCALIZER" for v in image_type)


def scan_export(root: str | os.PathLike, out: Path, report: ImportReport, *, workers: int = 1,
                max_files: int = MAX_FILES, max_depth: int = MAX_DEPTH, progress: bool = True
                ) -> dict[str, dict[str, list[tuple[Path, dict[str, Any]]]]]:
    """Headers of every file under ``root`` grouped as ``{study_uid: {series_uid: [(path, header), ...]}}``.

    Header reads are resumable: each file's header is stored under (path, size, mtime) in ``out/.import_state``,
    so a rerun after a kill reads only the files it had not reached, and a changed file is read again.
    """
    root = Path(root)
    if not root.is_dir():
        raise RadFM3DInputError(root, "--root is not a folder")
    files = _walk(root, max_files, max_depth)
    state = ItemState(out, "dicom_headers")

    def key_of(path: Path) -> str:
        st = path.stat()
        return f"{path.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}"

    def one(path: Path) -> tuple[Path, str, dict[str, Any]]:
        try:
            key = key_of(path)
        except OSError as err:
            return path, "", {"error": f"cannot stat ({err.strerror})"}
        cached = state.get(key)
        return path, key, cached if cached is not None else read_header(path)

    def results():
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                yield from pool.map(one, files)
        else:
            yield from map(one, files)

    studies: dict[str, dict[str, list[tuple[Path, dict[str, Any]]]]] = defaultdict(lambda: defaultdict(list))
    bar = progress_bar(len(files), enabled=progress, desc="DICOM headers", unit="file")
    try:
        for path, key, header in results():
            bar.update(1)
            if key and key not in state:
                state.put(key, header)
            rel = str(path.relative_to(root))
            if "error" in header:
                report.skip(rel, header["error"])
            elif "Rows" not in header or "Columns" not in header:
                report.skip(rel, f"not an image: {header.get('Modality', 'unknown')} object")
            else:
                studies[header["StudyInstanceUID"]][header["SeriesInstanceUID"]].append((path, header))
    finally:
        bar.close()
        state.close()
    report.extra["files_scanned"] = len(files)
    report.extra["headers_reused_from_earlier_run"] = state.reused
    return studies


def _series_location(files: Sequence[Path], folder_series: Mapping[Path, set[str]], uid: str
                     ) -> tuple[Path, str | None]:
    """(folder to name, series UID to pick or None when the folder holds only this series)."""
    folders = {p.parent for p in files}
    folder = folders.pop() if len(folders) == 1 else Path(os.path.commonpath([str(p.parent) for p in files]))
    only_this = folder_series.get(folder, set()) == {uid} and not folders
    return folder, None if only_this else uid


def _reports_for(csv_path: Path, key_column: str, text_column: str, wanted: set[str], report: ImportReport
                 ) -> dict[str, str]:
    """Report texts of the wanted studies, streamed from the CSV (memory independent of its row count)."""
    found: dict[str, str] = {}
    try:
        fh = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise RadFM3DInputError(csv_path, f"cannot open the reports CSV ({err.strerror})") from None
    with fh:
        try:
            sample = fh.read(4096)
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t") if sample else csv.excel
        except (csv.Error, UnicodeDecodeError):
            dialect = csv.excel
        fh.seek(0)
        reader = csv.DictReader(fh, dialect=dialect)
        try:
            columns = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as err:
            raise RadFM3DInputError(csv_path, f"reports CSV is not readable UTF-8 CSV ({err})") from None
        missing = [c for c in (key_column, text_column) if c not in columns]
        if missing:
            raise RadFM3DInputError(csv_path, f"reports CSV lacks column(s) {missing}; it has {columns}")
        try:
            for row_number, row in enumerate(reader, start=2):
                key, text = (row.get(key_column) or "").strip(), (row.get(text_column) or "").strip()
                if not key or not text:
                    report.skip(f"{csv_path.name}:row {row_number}", f"reports CSV row without {key_column} or "
                                                                     f"{text_column}")
                    continue
                if key in wanted:
                    if key in found and found[key] != text:
                        report.note(f"{csv_path.name}:row {row_number}", f"second report for {key}; kept the first")
                        continue
                    found.setdefault(key, text)
        except (UnicodeDecodeError, csv.Error) as err:
            raise RadFM3DInputError(csv_path, f"reports CSV is not readable UTF-8 CSV near row {reader.line_num} "
                                              f"({err})") from None
    return found


def _series_label(info: Mapping[str, Any]) -> str:
    parts = [str(info["modality"]), str(info["orientation"])]
    if info.get("description"):
        parts.append(repr(str(info["description"])))
    return ", ".join(parts)


def import_dicom_export(root: str | os.PathLike, out: str | os.PathLike, *, reports: str | os.PathLike | None = None,
                        report_key: str = "accession", report_column: str = "report",
                        split_fractions: Sequence[float] | None = None, seed: int = 0, max_series: int = 4,
                        modalities: Sequence[str] = IMAGE_MODALITIES, workers: int = 1, max_files: int = MAX_FILES,
                        max_depth: int = MAX_DEPTH, progress: bool = True) -> ImportReport:
    """Import a DICOM export folder; writes ``<split>.jsonl`` (or ``manifest.jsonl``) and the import report.

    Args:
        root: the export folder.
        out: output folder (created; manifests name images relative to it).
        reports: optional CSV of report texts, one row per study.
        report_key: ``"accession"`` (AccessionNumber column) or ``"study-uid"`` (StudyInstanceUID column).
        report_column: the CSV column holding the report text.
        split_fractions: train/val/test fractions, assigned per PatientID; None writes one ``manifest.jsonl``.
        max_series: most series per study record (the ones with most images; the rest are noted).
        modalities: series of other modalities are left out (and listed).
    """
    root, out_dir = Path(root), check_out_dir(out)
    key_column = {"accession": "AccessionNumber", "study-uid": "StudyInstanceUID"}.get(report_key)
    if key_column is None:
        raise ValueError(f"report_key must be 'accession' or 'study-uid', got {report_key!r}")
    report = ImportReport("dicom-export", root, {"reports": str(reports) if reports else None,
                                                 "report_key": report_key, "split_fractions": split_fractions,
                                                 "max_series": max_series, "modalities": list(modalities)})
    studies = scan_export(root, out_dir, report, workers=workers, max_files=max_files, max_depth=max_depth,
                          progress=progress)
    folder_series: dict[Path, set[str]] = defaultdict(set)
    for series in studies.values():
        for uid, items in series.items():
            for path, _ in items:
                folder_series[path.parent].add(uid)

    def study_key(series: Mapping[str, list[tuple[Path, dict[str, Any]]]], study_uid: str) -> str:
        first = next(iter(series.values()))[0][1]
        return str(first.get("AccessionNumber") or "") if key_column == "AccessionNumber" else study_uid

    texts: dict[str, str] = {}
    if reports is not None:
        wanted = {study_key(series, uid) for uid, series in studies.items()} - {""}
        texts = _reports_for(Path(reports), key_column, report_column, wanted, report)

    def records():
        for study_uid in sorted(studies):
            series = studies[study_uid]
            described = []
            for uid, items in series.items():
                headers = [h for _, h in items]
                info = describe_series(headers)
                where = f"study {study_uid} series {uid}"
                if any(_is_localizer(h) for h in headers) and all(_is_localizer(h) for h in headers):
                    report.skip(where, "localizer series")
                    continue
                if str(info["modality"]).upper() not in modalities:
                    report.skip(where, f"modality {info['modality']} not imported (--modalities)")
                    continue
                if info.get("irregular_slice_gaps"):
                    report.note(where, f"{info['irregular_slice_gaps']} irregular slice gap(s): slices may be "
                                       "missing; the reader refuses such a series when it is used")
                folder, pick = _series_location([p for p, _ in items], folder_series, uid)
                described.append((info, folder, pick))
            if not described:
                report.skip(f"study {study_uid}", "no importable image series")
                continue
            described.sort(key=lambda d: -int(d[0]["images"]))
            if len(described) > max_series:
                report.note(f"study {study_uid}", f"{len(described)} image series; kept the {max_series} with most "
                                                  "images (--max-series)")
                described = described[:max_series]
            described.sort(key=lambda d: (d[0].get("series_number") is None, d[0].get("series_number") or 0))
            first = next(iter(series.values()))[0][1]
            patient = str(first.get("PatientID") or "unknown-patient")
            accession = str(first.get("AccessionNumber") or "")
            lines = [f"Series {i + 1} ({_series_label(info)}): <image>" for i, (info, _, _) in enumerate(described)]
            record: dict[str, Any] = {
                "id": f"{patient}-{accession or study_uid}", "images": [relative_image_path(f, out_dir)
                                                                         for _, f, _ in described],
                "task": "report", "modality": "+".join(dict.fromkeys(str(i["modality"]) for i, _, _ in described)),
                "prompt": "\n".join(lines) + "\nWrite the radiology report for this study.",
                "patient_id": patient, "study_id": study_uid,
                "study": {"study_uid": study_uid, "accession": accession or None, "date": first.get("StudyDate"),
                          "description": first.get("StudyDescription"), "series": [i for i, _, _ in described]}}
            if any(pick for _, _, pick in described):
                record["image_series"] = [pick for _, _, pick in described]
            text = texts.get(study_key(series, study_uid))
            if text:
                record["answer"] = text
            elif reports is not None:
                report.note(f"study {study_uid}", "no report in the reports CSV; written without an answer")
            split = split_of(patient, split_fractions, seed) if split_fractions else "manifest"
            yield split, record

    write_split_manifests(records(), out_dir, report)
    report.extra["studies"] = len(studies)
    report.write(out_dir)
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d import dicom-export --root EXPORT --out DIR [--reports CSV] ...``."""
    parser = argparse.ArgumentParser(prog="radfm3d import dicom-export", description=(
        "Group a DICOM export (nested or flat) into one manifest record per study from the headers only; series "
        "are described (modality, body part, description, orientation, spacing). Resumable; writes "
        "import_report.json and report.md beside the manifests."))
    parser.add_argument("--root", required=True, help="the export folder")
    parser.add_argument("--out", required=True, help="output folder for the manifests and the import report")
    parser.add_argument("--reports", default=None, help="CSV with one report per study (optional)")
    parser.add_argument("--report-key", choices=("accession", "study-uid"), default="accession",
                        help="which column joins the CSV to the studies: AccessionNumber or StudyInstanceUID")
    parser.add_argument("--report-column", default="report", help="the CSV column holding the report text")
    parser.add_argument("--split-fractions", default=None,
                        help="train,val,test fractions assigned per patient, e.g. 0.8,0.1,0.1 (default: one "
                             "manifest.jsonl)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-patient split (default 0)")
    parser.add_argument("--max-series", type=int, default=4, help="most series per study record (default 4)")
    parser.add_argument("--modalities", default=",".join(IMAGE_MODALITIES),
                        help="comma-separated modalities to import (default: all image modalities)")
    parser.add_argument("--workers", type=int, default=1, help="threads reading headers (default 1)")
    parser.add_argument("--max-files", type=int, default=MAX_FILES, help=f"walk bound (default {MAX_FILES})")
    parser.add_argument("--max-depth", type=int, default=MAX_DEPTH, help=f"folder depth bound (default {MAX_DEPTH})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        fractions = parse_fractions(args.split_fractions)
    except ValueError as err:
        parser.error(str(err))
    report = import_dicom_export(
        args.root, args.out, reports=args.reports, report_key=args.report_key, report_column=args.report_column,
        split_fractions=fractions, seed=args.seed, max_series=args.max_series,
        modalities=tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip()),
        workers=args.workers, max_files=args.max_files, max_depth=args.max_depth, progress=not args.no_progress)
    print(f"radfm3d import dicom-export: {report.summary_line()}; report: {Path(args.out) / 'report.md'}",
          file=sys.stderr)
    return 0
