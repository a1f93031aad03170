# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import csv``: a CSV/TSV with an image-path column and text columns -> a manifest, mapped by options.

Each row becomes one record: ``images`` from ``--image-column`` (several paths in one cell split on ``;`` or ``|``),
``answer`` from ``--answer-column``, the prompt from ``--prompt`` (a template with ``{column}`` fields; ``<image>``
placeholders are added in front when the template has none) or ``--prompt-column``. Optional columns give ``id``,
``task``, ``modality``, ``region``, the split, ``choices`` and patient/study keys. The CSV is streamed (memory
independent of its row count); a bad row (missing image, empty answer, unknown split, template field missing) is
reported with its row number and skipped.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from radfm3d.data.importers.common import (SPLITS, ImportReport, check_out_dir, parse_fractions, relative_image_path,
                                           split_of, write_split_manifests)
from radfm3d.data.manifest import IMAGE_PLACEHOLDER
from radfm3d.errors import RadFM3DInputError
from radfm3d.utils import progress_bar

__all__ = ["import_csv", "cli"]

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
_FIELD = re.compile(r"{([^{}]+)}")


def _open_table(path: Path, delimiter: str | None) -> tuple[Any, csv.DictReader]:
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise RadFM3DInputError(path, f"cannot open the table ({err.strerror})") from None
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else None
    if delimiter is None:
        try:
            sample = fh.read(8192)
            fh.seek(0)
            delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t").delimiter if sample else ","
        except (csv.Error, UnicodeDecodeError):
            fh.seek(0)
            delimiter = ","
    return fh, csv.DictReader(fh, delimiter=delimiter)


def import_csv(table: str | os.PathLike, out: str | os.PathLike, *, image_column: str,
               answer_column: str | None = None, prompt: str | None = None, prompt_column: str | None = None,
               root: str | os.PathLike | None = None, id_column: str | None = None, task: str = "report",
               task_column: str | None = None, modality_column: str | None = None, region_column: str | None = None,
               split_column: str | None = None, split_fractions: Sequence[float] | None = None,
               group_column: str | None = None, study_column: str | None = None, choices_column: str | None = None,
               delimiter: str | None = None, check_files: bool = True, seed: int = 0,
               progress: bool = True) -> ImportReport:
    """Import a table; writes ``<split>.jsonl`` (or ``manifest.jsonl``), ``import_report.json`` and ``report.md``.

    Image paths are relative to ``root`` (default: the table's folder) unless absolute. With ``split_fractions``
    the split is drawn per ``group_column`` value (e.g. the patient ID; default the row's id), so one patient never
    spans two splits.
    """
    table, out_dir = Path(table), check_out_dir(out)
    base = Path(root) if root is not None else table.parent
    if prompt is None and prompt_column is None:
        prompt = "Write the radiology report for this scan."
    report = ImportReport("csv", table, {"image_column": image_column, "answer_column": answer_column,
                                         "prompt": prompt, "prompt_column": prompt_column, "root": str(base)})
    fh, reader = _open_table(table, delimiter)
    with fh:
        try:
            columns = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as err:
            raise RadFM3DInputError(table, f"not readable as UTF-8 CSV near row 1 ({err})") from None
        wanted = [c for c in (image_column, answer_column, prompt_column, id_column, task_column, modality_column,
                              region_column, split_column, group_column, study_column, choices_column) if c]
        wanted += _FIELD.findall(prompt or "")
        missing = sorted({c for c in wanted if c not in columns})
        if missing:
            raise RadFM3DInputError(table, f"column(s) {missing} not in the table; it has {columns}")
        bar = progress_bar(0, enabled=progress, desc=f"rows of {table.name}", unit="row")

        def records():
            try:
                for row_number, row in enumerate(reader, start=2):
                    bar.update(1)
                    where = f"{table.name}:row {row_number}"
                    made = _record(row, row_number, where)
                    if made is not None:
                        yield made
            except (UnicodeDecodeError, csv.Error) as err:
                raise RadFM3DInputError(table, f"not readable as UTF-8 CSV near row {reader.line_num} ({err})"
                                        ) from None

        def _record(row: Mapping[str, Any], row_number: int, where: str) -> tuple[str, dict[str, Any]] | None:
            cell = (row.get(image_column) or "").strip()
            paths = [p.strip() for p in re.split(r"[;|]", cell) if p.strip()]
            if not paths:
                report.skip(where, f"empty {image_column}")
                return None
            full = [Path(p) if Path(p).is_absolute() else base / p for p in paths]
            absent = [str(p) for p in full if not p.exists()]
            if check_files and absent:
                report.skip(where, f"image not found: {absent[0]}")
                return None
            if prompt_column:
                text = (row.get(prompt_column) or "").strip()
            else:
                text = prompt.format_map({k: (v or "") for k, v in row.items()})
            if not text:
                report.skip(where, f"empty {prompt_column}")
                return None
            if IMAGE_PLACEHOLDER not in text:
                text = " ".join([IMAGE_PLACEHOLDER] * len(paths)) + " " + text
            elif text.count(IMAGE_PLACEHOLDER) != len(paths):
                report.skip(where, f"prompt has {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} but the row "
                                   f"names {len(paths)} image(s)")
                return None
            record: dict[str, Any] = {
                "id": (row.get(id_column) or "").strip() if id_column else f"{table.stem}-row{row_number}",
                "images": [relative_image_path(p, out_dir) for p in full], "prompt": text,
                "task": (row.get(task_column) or "").strip() if task_column else task}
            if not record["id"]:
                report.skip(where, f"empty {id_column}")
                return None
            if answer_column:
                answer = (row.get(answer_column) or "").strip()
                if not answer:
                    report.skip(where, f"empty {answer_column}")
                    return None
                record["answer"] = answer
            if choices_column and (row.get(choices_column) or "").strip():
                record["choices"] = [c.strip() for c in re.split(r"[;|]", row[choices_column]) if c.strip()]
            for key, column in (("modality", modality_column), ("region", region_column),
                                ("patient_id", group_column), ("study_id", study_column)):
                if column and (row.get(column) or "").strip():
                    record[key] = row[column].strip()
            if split_column:
                split = _SPLIT_ALIASES.get((row.get(split_column) or "").strip().lower())
                if split is None:
                    report.skip(where, f"unknown split {row.get(split_column)!r} (expected one of {SPLITS})")
                    return None
            elif split_fractions:
                group = (row.get(group_column) or "").strip() if group_column else record["id"]
                split = split_of(group or record["id"], split_fractions, seed)
            else:
                split = "manifest"
            return split, record

        try:
            write_split_manifests(records(), out_dir, report)
        finally:
            bar.close()
    report.write(out_dir)
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d import csv --csv TABLE --image-column COL --out DIR [...]``."""
    parser = argparse.ArgumentParser(prog="radfm3d import csv", description=(
        "Turn a CSV/TSV with an image-path column and text columns into a manifest. Bad rows are reported with "
        "their row number and skipped; import_report.json and report.md are written beside the manifests."))
    parser.add_argument("--csv", required=True, dest="table", help="the CSV/TSV file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--root", default=None, help="folder the image paths are relative to (default: the CSV's)")
    parser.add_argument("--image-column", required=True, help="column with the image path(s); several: a;b")
    parser.add_argument("--answer-column", default=None, help="column with the target text (report, answer)")
    parser.add_argument("--prompt", default=None,
                        help="prompt template with {column} fields (default: 'Write the radiology report for this "
                             "scan.'); <image> placeholders are added in front when it has none")
    parser.add_argument("--prompt-column", default=None, help="column holding the prompt (instead of --prompt)")
    parser.add_argument("--id-column", default=None, help="column with a unique record id (default: row number)")
    parser.add_argument("--task", default="report", help="task name for every record (default report)")
    parser.add_argument("--task-column", default=None, help="column with each record's task")
    parser.add_argument("--modality-column", default=None)
    parser.add_argument("--region-column", default=None)
    parser.add_argument("--choices-column", default=None, help="column with closed-question choices (a;b;c)")
    parser.add_argument("--split-column", default=None, help="column with train/val/test per row")
    parser.add_argument("--split-fractions", default=None, help="or: train,val,test fractions, e.g. 0.8,0.1,0.1")
    parser.add_argument("--group-column", default=None, help="patient column: splits never divide a patient")
    parser.add_argument("--study-column", default=None, help="study column (study_id, for multi-series work)")
    parser.add_argument("--delimiter", default=None, help="field delimiter (default: sniffed; tab for .tsv)")
    parser.add_argument("--no-check-files", action="store_true", help="do not check that the images exist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.prompt is not None and args.prompt_column is not None:
        parser.error("give --prompt or --prompt-column, not both")
    try:
        fractions = parse_fractions(args.split_fractions)
    except ValueError as err:
        parser.error(str(err))
    report = import_csv(
        args.table, args.out, image_column=args.image_column, answer_column=args.answer_column, prompt=args.prompt,
        prompt_column=args.prompt_column, root=args.root, id_column=args.id_column, task=args.task,
        task_column=args.task_column, modality_column=args.modality_column, region_column=args.region_column,
        split_column=args.split_column, split_fractions=fractions, group_column=args.group_column,
        study_column=args.study_column, choices_column=args.choices_column, delimiter=args.delimiter,
        check_files=not args.no_check_files, seed=args.seed, progress=not args.no_progress)
    print(f"radfm3d import csv: {report.summary_line()}; report: {Path(args.out) / 'report.md'}", file=sys.stderr)
    return 0
