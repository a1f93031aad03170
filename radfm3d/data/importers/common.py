# Copyright (c) radfm3d contributors. Apache-2.0.
"""What every importer shares: the import report, split assignment, resumable per-item state and atomic outputs.

An importer turns a dataset folder into validated JSONL manifests under ``--out``:

- ``<split>.jsonl`` (or ``manifest.jsonl`` without splits): records as :mod:`radfm3d.data.manifest` defines them,
  each checked by ``validate_record`` before it is written; written atomically at the end.
- ``import_report.json`` and ``report.md``: counts per split and task, items skipped and why (with their row
  number or file), geometry notes, label prevalence.
- ``.import_state/<name>.jsonl``: per-item results appended and flushed as they are made, keyed by the item's
  identity (e.g. path + size + mtime); a rerun after a kill reuses them instead of reading the item again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from radfm3d.data.manifest import ManifestWriter, validate_record
from radfm3d.errors import RadFM3DInputError
from radfm3d.utils import atomic_write

__all__ = ["ImportReport", "ItemState", "parse_splits", "split_of", "parse_fractions", "write_split_manifests", "check_out_dir",
           "relative_image_path"]

SPLITS = ("train", "val", "test")


def parse_fractions(text: str | None) -> tuple[float, float, float] | None:
    """``"0.8,0.1,0.1"`` -> train/val/test fractions (None or "" -> no split); they must add up to 1."""
    if not text:
        return None
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--split-fractions {text!r}: expected three numbers such as 0.8,0.1,0.1") from None
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"--split-fractions {text!r}: expected three non-negative fractions adding up to 1")
    return parts  # type: ignore[return-value]


def parse_splits(parser: Any, text: str, known: Iterable[str], dataset: str) -> list[str]:
    """``--split a,b`` as a list; an unknown name is a usage error (``parser.error``) listing the dataset's splits."""
    known = list(known)
    splits = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in splits if s not in known]
    if bad or not splits:
        parser.error(f"--split: unknown split(s) {bad or [text]}; {dataset} has {' and '.join(known)}")
    return splits


def split_of(key: str, fractions: Sequence[float], seed: int = 0) -> str:
    """Deterministic split of a grouping key (a patient ID, so that no patient spans two splits).

    The key's SHA-256 (with the seed) gives a number in [0, 1) compared with the cumulative fractions; the same key
    always lands in the same split, whatever else is in the dataset or in which order it is read.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


class ImportReport:
    """Counts and problems of one import run, written as ``import_report.json`` and ``report.md``."""

    def __init__(self, importer: str, root: str | os.PathLike, options: Mapping[str, Any] | None = None) -> None:
        self.importer = importer
        self.root = str(root)
        self.options = dict(options or {})
        self.skipped: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.extra: dict[str, Any] = {}

    def skip(self, where: str, problem: str, **fields: Any) -> None:
        """An item left out: ``where`` names the file or ``"<csv>:row N"``; ``problem`` says why."""
        self.skipped.append({"where": where, "problem": problem, **fields})

    def note(self, where: str, message: str, **fields: Any) -> None:
        """Something the user should know about an imported item (e.g. a geometry fix)."""
        self.notes.append({"where": where, "message": message, **fields})

    def count(self, split: str, task: str) -> None:
        self.counts[split][task] += 1

    def to_dict(self) -> dict[str, Any]:
        reasons = Counter(s["problem"].split(":")[0] for s in self.skipped)
        return {"importer": self.importer, "root": self.root, "options": self.options,
                "records": {split: dict(sorted(c.items())) for split, c in sorted(self.counts.items())},
                "total_records": sum(sum(c.values()) for c in self.counts.values()),
                "skipped": len(self.skipped), "skipped_by_reason": dict(reasons.most_common()),
                "skipped_items": self.skipped, "notes": self.notes, **self.extra}

    def markdown(self) -> str:
        data = self.to_dict()
        lines = [f"# Import report: {self.importer}", "", f"Source: `{self.root}`", "",
                 "| split | task | records |", "|---|---|---|"]
        for split, tasks in data["records"].items():
            lines += [f"| {split} | {task} | {n} |" for task, n in tasks.items()]
        lines += ["", f"Skipped: {data['skipped']}"]
        lines += [f"- {reason}: {n}" for reason, n in data["skipped_by_reason"].items()]
        for item in self.skipped[:50]:
            lines.append(f"  - `{item['where']}`: {item['problem']}")
        if len(self.skipped) > 50:
            lines.append(f"  - ... and {len(self.skipped) - 50} more (import_report.json lists all)")
        if self.notes:
            lines += ["", f"Notes: {len(self.notes)}"]
            lines += [f"- `{n['where']}`: {n['message']}" for n in self.notes[:50]]
        for key, value in self.extra.items():
            lines += ["", f"## {key}", "", "```json", json.dumps(value, indent=1, default=str)[:4000], "```"]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        atomic_write(out / "import_report.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n",
                                                      encoding="utf-8"))
        atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(self.markdown(), encoding="utf-8"))

    def summary_line(self) -> str:
        data = self.to_dict()
        per_split = ", ".join(f"{s} {sum(t.values())}" for s, t in data["records"].items()) or "none"
        return f"{data['total_records']} records ({per_split}); {data['skipped']} item(s) skipped"


class ItemState:
    """Per-item results of an interrupted run: a JSONL file appended and flushed one line per item.

    ``get(key)`` returns what an earlier run stored for that key (the key must identify the item's content, e.g.
    path + size + mtime); ``put(key, value)`` appends. A torn last line (a kill mid-write) is ignored.
    """

    def __init__(self, out: Path, name: str) -> None:
        from radfm3d.data.manifest import iter_jsonl
        from radfm3d.utils import JsonlAppender

        self.path = out / ".import_state" / f"{name}.jsonl"
        # the appender cuts a line torn by a kill first; lines are flushed, not fsync-ed (a state file is a cache:
        # losing its tail to a power cut only means reading those items again)
        self._appender = JsonlAppender(self.path, fsync=False)
        self._done: dict[str, Any] = {entry["key"]: entry["value"] for _, entry in iter_jsonl(self.path)}
        self.reused = 0

    def get(self, key: str) -> Any:
        if key in self._done:
            self.reused += 1
            return self._done[key]
        return None

    def __contains__(self, key: str) -> bool:
        return key in self._done

    def put(self, key: str, value: Any) -> None:
        self._done[key] = value
        self._appender.write({"key": key, "value": value})

    def close(self) -> None:
        self._appender.close()


def check_out_dir(out: str | os.PathLike) -> Path:
    """The output folder, created; an existing file or an unwritable folder is refused before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RadFM3DInputError(path, "--out names an existing file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RadFM3DInputError(path, f"cannot create the output folder ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise RadFM3DInputError(path, "the output folder is not writable")
    return path


def write_split_manifests(records: Iterable[tuple[str, Mapping[str, Any]]], out: Path, report: ImportReport,
                          base_dir: Path | None = None) -> dict[str, Path]:
    """Write ``(split, record)`` pairs into ``<split>.jsonl`` files atomically; invalid records are reported.

    Image paths are written as the importer made them (see :func:`relative_image_path`). A ``patient_id`` found in
    two splits (e.g. a table's own split column that splits a patient) is a note in the report and is listed under
    ``patients_in_several_splits`` (the records are kept: the split is the dataset's choice).
    """
    writers: dict[str, ManifestWriter] = {}
    patient_splits: dict[str, set[str]] = defaultdict(set)
    try:
        for split, record in records:
            problems = validate_record(record)
            if problems:
                report.skip(str(record.get("id", "?")), "invalid record: " + "; ".join(problems))
                continue
            if isinstance(record.get("patient_id"), str):
                patient_splits[record["patient_id"]].add(split)
            if split not in writers:
                writers[split] = ManifestWriter(out / f"{split}.jsonl")
            writers[split].write(record)
            report.count(split, str(record.get("task", "none")))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    shared = {patient: sorted(found) for patient, found in sorted(patient_splits.items()) if len(found) > 1}
    if shared:
        report.extra["patients_in_several_splits"] = shared
        report.note("splits", f"{len(shared)} patient(s) have records in several splits (first: "
                    f"{next(iter(shared))!r} in {', '.join(next(iter(shared.values())))}); held-out scores may be "
                    "optimistic")
    return {split: writer.close() for split, writer in writers.items()}


def relative_image_path(image: Path, out: Path) -> str:
    """An image path as a manifest in ``out`` names it: relative to ``out`` (manifests resolve against their own
    folder), so the dataset and the manifests can move together."""
    return os.path.relpath(Path(image).resolve(), Path(out).resolve())
