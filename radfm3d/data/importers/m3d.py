# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import m3d-cap`` and ``m3d-vqa``: the M3D-Data sets (Bai et al., M3D) -> report and VQA records.

Layout read (as the M3D repository's loaders read it; paths in the files are relative to the data root)::

    M3D-Cap:  <root>/<json>   {"train": [{"image": "ct_case/000006/Axial_C__portal_venous_phase.npy",
                                          "text": "ct_case/000006/text.txt"}, ...], "validation": [...], "test": [...]}
    M3D-VQA:  <root>/<csv>    columns Image Path, Text, Question Type, Question, Choice A..D, Answer, Answer Choice

Geometry: M3D's images are ``.npy`` arrays of shape ``(1, 32, 256, 256)`` = (channel, depth, height, width),
cropped to the foreground, resized and min-max normalised to [0, 1]: they carry **no spacing, no orientation and no
HU**. Records say so: ``image_meta`` = ``{"array_axes": "CZYX"}`` (read on a nominal 1 mm grid, ``geometry_known``
False), and the import report repeats it. Boxes a model writes on these images therefore map to array indices only,
not to patient millimetres; use a recipe with ``intensity: "minmax"`` (the arrays are not in HU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from radfm3d.data.importers.common import ImportReport, check_out_dir, relative_image_path, write_split_manifests
from radfm3d.data.importers.table_index import stream_csv
from radfm3d.errors import RadFM3DInputError
from radfm3d.utils import progress_bar

__all__ = ["import_m3d_cap", "import_m3d_vqa", "cli_cap", "cli_vqa", "GEOMETRY_STATEMENT"]

GEOMETRY_STATEMENT = ("M3D images are (1, 32, 256, 256) arrays (channel, depth, height, width), foreground-cropped, "
                      "resized and normalised to [0, 1]: no spacing, orientation or HU. They are read on a nominal "
                      "1 mm grid (geometry_known false); boxes map to array indices, not patient millimetres.")
_ARRAY_META = {"array_axes": "CZYX"}
_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
_VQA_COLUMNS = ("Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer",
                "Answer Choice")
_QUESTION_TYPES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "location"}


def _find_cap_json(root: Path) -> Path:
    for path in sorted(root.glob("*.json")):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and any(k in data for k in ("train", "validation", "test")):
            return path
    raise RadFM3DInputError(root, "no M3D-Cap JSON (an object with train/validation/test lists) in this folder; "
                                  "pass --json")


def _image(root: Path, rel: Any, where: str, report: ImportReport) -> Path | None:
    if not isinstance(rel, str) or not rel.strip():
        report.skip(where, "no image path")
        return None
    path = root / rel.strip()
    if path.suffix.lower() != ".npy":
        report.skip(where, f"image {rel!r} is not an .npy array")
        return None
    if not path.is_file():
        report.skip(where, f"image not found: {path}")
        return None
    return path


def import_m3d_cap(root: str | os.PathLike, out: str | os.PathLike, *, json_path: str | os.PathLike | None = None,
                   splits: Sequence[str] = ("train", "validation", "test"), progress: bool = True) -> ImportReport:
    """Import M3D-Cap (image-report pairs) into ``train/val/test.jsonl`` report records."""
    root, out_dir = Path(root), check_out_dir(out)
    source = Path(json_path) if json_path else _find_cap_json(root)
    try:
        with open(source, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError) as err:
        raise RadFM3DInputError(source, f"not a readable M3D-Cap JSON ({err})") from None
    report = ImportReport("m3d-cap", root, {"json": str(source), "splits": list(splits)})
    report.extra["geometry"] = GEOMETRY_STATEMENT

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for split in splits:
            items = data.get(split)
            if items is None:
                report.note(source.name, f"no {split!r} list")
                continue
            bar = progress_bar(len(items), enabled=progress, desc=f"M3D-Cap {split}", unit="pair")
            try:
                for number, item in enumerate(items):
                    bar.update(1)
                    where = f"{source.name}:{split}[{number}]"
                    if not isinstance(item, Mapping):
                        report.skip(where, "entry is not an object with image/text")
                        continue
                    image = _image(root, item.get("image"), where, report)
                    text_rel = item.get("text")
                    if image is None:
                        continue
                    text_path = root / str(text_rel or "")
                    try:
                        text = text_path.read_text(encoding="utf-8").strip()
                    except (OSError, UnicodeDecodeError) as err:
                        report.skip(where, f"report text unreadable: {text_path} ({err})")
                        continue
                    if len(text) < 5:
                        report.skip(where, "empty report text")
                        continue
                    case = Path(str(item.get("image"))).parent.as_posix()
                    yield _SPLITS.get(split, split), {
                        "id": f"m3d-cap-{split}-{number}", "images": [relative_image_path(image, out_dir)],
                        "image_meta": [dict(_ARRAY_META)], "task": "report", "modality": "CT",
                        "prompt": "<image> Describe the findings of this CT scan.", "answer": " ".join(text.split()),
                        "study_id": case, "source": {"dataset": "M3D-Cap", "image": item.get("image")}}
            finally:
                bar.close()

    write_split_manifests(records(), out_dir, report)
    report.write(out_dir)
    return report


def import_m3d_vqa(root: str | os.PathLike, out: str | os.PathLike, *, csv_paths: Mapping[str, str | os.PathLike],
                   open_ended: bool = True, progress: bool = True) -> ImportReport:
    """Import M3D-VQA CSVs (``{split: csv}``) into closed (choices) and, with ``open_ended``, open VQA records."""
    root, out_dir = Path(root), check_out_dir(out)
    report = ImportReport("m3d-vqa", root, {"csv": {k: str(v) for k, v in csv_paths.items()}, "open": open_ended})
    report.extra["geometry"] = GEOMETRY_STATEMENT
    per_type: dict[str, int] = {}

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for split, csv_path in csv_paths.items():
            csv_path = Path(csv_path)
            bar = progress_bar(0, enabled=progress, desc=f"M3D-VQA {split}", unit="row")
            try:
                for row_number, row in stream_csv(csv_path, _VQA_COLUMNS):
                    bar.update(1)
                    where = f"{csv_path.name}:row {row_number}"
                    image = _image(root, row.get("Image Path"), where, report)
                    if image is None:
                        continue
                    question, answer = (row.get("Question") or "").strip(), (row.get("Answer") or "").strip()
                    letter = (row.get("Answer Choice") or "").strip().upper()
                    options = {c: (row.get(f"Choice {c}") or "").strip() for c in "ABCD"}
                    if not question or not answer:
                        report.skip(where, "empty question or answer")
                        continue
                    if letter not in options or not options[letter]:
                        report.skip(where, f"answer choice {letter!r} is not one of the filled choices A-D")
                        continue
                    choices = [f"{c}. {t}" for c, t in options.items() if t]
                    if len(set(choices)) != len(choices):
                        report.skip(where, "repeated choices")
                        continue
                    qtype = _QUESTION_TYPES.get((row.get("Question Type") or "").strip(),
                                                (row.get("Question Type") or "other").strip().lower())
                    per_type[qtype] = per_type.get(qtype, 0) + 1
                    base = {"images": [relative_image_path(image, out_dir)], "image_meta": [dict(_ARRAY_META)],
                            "modality": "CT", "question_type": qtype,
                            "source": {"dataset": "M3D-VQA", "row": row_number, "image": row.get("Image Path")}}
                    yield split, {**base, "id": f"m3d-vqa-{split}-{row_number}-closed", "task": "vqa_closed",
                                  "prompt": f"<image> {question} Choices: {' '.join(choices)}",
                                  "answer": f"{letter}. {options[letter]}", "choices": choices}
                    if open_ended:
                        yield split, {**base, "id": f"m3d-vqa-{split}-{row_number}-open", "task": "vqa_open",
                                      "prompt": f"<image> {question}", "answer": answer}
            finally:
                bar.close()

    write_split_manifests(records(), out_dir, report)
    report.extra["question_types"] = dict(sorted(per_type.items()))
    report.write(out_dir)
    return report


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="the data root the dataset's paths are relative to")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cli_cap(argv: Sequence[str] | None = None) -> int:
    """``radfm3d import m3d-cap --root DATA --out DIR [--json M3D_Cap.json] [--split train,validation,test]``."""
    parser = argparse.ArgumentParser(prog="radfm3d import m3d-cap", description=(
        "Import M3D-Cap image-report pairs into report records. " + GEOMETRY_STATEMENT))
    _common_args(parser)
    parser.add_argument("--json", default=None, help="the M3D-Cap JSON (default: the one JSON in --root with "
                                                     "train/validation/test lists)")
    parser.add_argument("--split", default="train,validation,test", help="lists of the JSON to import")
    args = parser.parse_args(list(argv) if argv is not None else None)
    report = import_m3d_cap(args.root, args.out, json_path=args.json,
                            splits=[s.strip() for s in args.split.split(",") if s.strip()],
                            progress=not args.no_progress)
    print(f"radfm3d import m3d-cap: {report.summary_line()}; report: {Path(args.out) / 'report.md'}", file=sys.stderr)
    return 0


def cli_vqa(argv: Sequence[str] | None = None) -> int:
    """``radfm3d import m3d-vqa --root DATA --out DIR --csv train=M3D_VQA_train.csv [--csv test=...]``."""
    parser = argparse.ArgumentParser(prog="radfm3d import m3d-vqa", description=(
        "Import M3D-VQA CSVs into closed (choices A-D) and open VQA records. " + GEOMETRY_STATEMENT))
    _common_args(parser)
    parser.add_argument("--csv", action="append", required=True, metavar="SPLIT=CSV",
                        help="a split and its CSV (repeat: --csv train=M3D_VQA_train.csv --csv test=M3D_VQA_test.csv)")
    parser.add_argument("--closed-only", action="store_true", help="no open-ended records")
    args = parser.parse_args(list(argv) if argv is not None else None)
    csv_paths: dict[str, str] = {}
    for item in args.csv:
        split, sep, path = item.partition("=")
        if not sep or not split.strip() or not path.strip():
            parser.error(f"--csv {item!r}: expected SPLIT=CSV, e.g. train=M3D_VQA_train.csv")
        full = Path(path.strip())
        csv_paths[split.strip()] = str(full if full.is_absolute() or full.exists() else Path(args.root) / full)
    report = import_m3d_vqa(args.root, args.out, csv_paths=csv_paths, open_ended=not args.closed_only,
                            progress=not args.no_progress)
    print(f"radfm3d import m3d-vqa: {report.summary_line()}; report: {Path(args.out) / 'report.md'}", file=sys.stderr)
    return 0
