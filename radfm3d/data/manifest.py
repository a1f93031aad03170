# Copyright (c) radfm3d contributors. Apache-2.0.
"""JSONL manifests: the one data format for training, evaluation and users' own data.

One JSON object per line::

    {"id": "case-000123-vqa_presence-0", "images": ["images/shard-000/case-000123.nii.gz"],
     "modality": "CT", "region": "chest", "task": "vqa_presence",
     "prompt": "<image> Is there a nodule in the left lung?", "answer": "Yes.",
     "choices": ["Yes.", "No."], "ground_truth": {...}}

Rules (checked by :func:`validate_record` / :func:`validate_manifest`):

- ``id``: non-empty string, unique within a manifest.
- ``images``: list of strings (paths relative to the manifest's folder, or absolute); may be empty for
  text-only records. A path may name a file (NIfTI, NRRD, MHA, DICOM, PNG ...) or a DICOM series folder.
- ``prompt``: string with exactly one ``<image>`` placeholder per entry of ``images`` (in order).
- ``answer`` (optional for inference-only manifests): string.
- ``choices`` (closed questions): non-empty list of distinct strings that contains ``answer``.
- ``task``, ``modality``, ``region`` (optional): strings.
- ``ground_truth`` (optional): JSON object (structured findings, boxes in world RAS mm).
- ``image_series`` / ``image_meta`` (optional): per-image series choice and corrections, one entry per image
  (:mod:`radfm3d.data.image_meta`).
- ``study_id`` / ``patient_id`` (optional): non-empty strings; records of one visit share ``study_id``, one
  patient's records share ``patient_id``; within a manifest one ``study_id`` has one ``patient_id``, and
  :func:`check_patient_splits` checks that no patient sits in two splits.
- ``image_modalities`` (optional): one non-empty string per entry of ``images`` (e.g. ``["CT", "MR T1"]``).
- ``report_structures`` (optional): list of ``{"text": sentence, "structure": name, "box_world_mm": [x1, y1, z1,
  x2, y2, z2] (RAS mm, lo <= hi), "mask": path, "mask_label": int >= 0}``; ``box_world_mm``, ``mask`` and
  ``mask_label`` may be absent (``mask_label`` only with ``mask``).
- ``labels`` (optional): ``{"<class name>": 0 | 1}``.
- any other keys are kept untouched.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from radfm3d.errors import RadFM3DInputError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "REQUIRED_KEYS",
    "iter_jsonl",
    "read_jsonl",
    "read_manifest",
    "write_manifest",
    "write_jsonl",
    "ManifestWriter",
    "validate_record",
    "validate_manifest",
    "check_patient_splits",
    "resolve_images",
    "sample_by_task",
    "scale_task_mix",
    "parse_task_counts",
]

IMAGE_PLACEHOLDER = "<image>"
REQUIRED_KEYS = ("id", "images", "prompt")
_OPTIONAL_STR_KEYS = ("answer", "task", "modality", "region")
_ID_KEYS = ("study_id", "patient_id")
_STRUCTURE_KEYS = ("text", "structure", "box_world_mm", "mask", "mask_label")


def _lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (JSON's ``"\\ud800"`` decodes to one), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _json_line(record: Any, path: Path, number: int) -> str:
    """One JSONL line for ``record`` (record ``number``, 1-based); ``RadFM3DInputError`` when it cannot be one."""
    try:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        line.encode("utf-8")
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RadFM3DInputError(path, f"record {number} cannot be written as a JSON line ({problem})") from None
    return line + "\n"


def validate_record(record: Any, *, base_dir: str | os.PathLike | None = None,
                    check_files: bool = False, require_prompt: bool = True) -> list[str]:
    """Problems of one manifest record (empty list = valid).

    Args:
        record: the decoded JSON object.
        base_dir: folder that relative image paths are resolved against (needed for ``check_files``).
        check_files: also check that every image path exists.
        require_prompt: ``prompt`` is a required key (generative records). Image-report pairs for contrastive
            training and evaluation need none; a prompt that is given is still checked.
    """
    if not isinstance(record, Mapping):
        return [f"a record must be a JSON object, got {type(record).__name__}"]
    problems: list[str] = []
    missing = [k for k in REQUIRED_KEYS if k not in record and (require_prompt or k != "prompt")]
    if missing:
        problems.append(f"missing required key(s) {', '.join(missing)}")
    rid = record.get("id")
    if "id" in record and (not isinstance(rid, str) or not rid.strip()):
        problems.append(f"'id' must be a non-empty string, got {rid!r}")
    images = record.get("images")
    images_ok = isinstance(images, list) and all(isinstance(p, str) and p for p in images)
    if "images" in record and not images_ok:
        problems.append(f"'images' must be a list of non-empty path strings, got {images!r}")
    prompt = record.get("prompt")
    if "prompt" in record and not isinstance(prompt, str):
        problems.append(f"'prompt' must be a string, got {type(prompt).__name__}")
    if isinstance(prompt, str) and images_ok:
        n_ph = prompt.count(IMAGE_PLACEHOLDER)
        if n_ph != len(images):
            problems.append(f"'prompt' has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but 'images' lists "
                            f"{len(images)} image(s)")
    for key in _OPTIONAL_STR_KEYS:
        if key in record and not isinstance(record[key], str):
            problems.append(f"'{key}' must be a string, got {type(record[key]).__name__}")
    for key in ("id", "prompt", *_OPTIONAL_STR_KEYS):
        value = record.get(key)
        if isinstance(value, str) and (bad := _lone_surrogate(value)) is not None:
            problems.append(f"'{key}' holds a lone surrogate {value[bad]!r} at character {bad} (a JSON \\ud8xx "
                            "escape without its pair): not valid Unicode text")
    if "choices" in record:
        choices = record["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            problems.append(f"'choices' must be a non-empty list of strings, got {choices!r}")
        else:
            if len(set(choices)) != len(choices):
                problems.append(f"'choices' has duplicates: {choices!r}")
            answer = record.get("answer")
            if isinstance(answer, str) and answer not in choices:
                problems.append(f"'answer' {answer!r} is not one of 'choices' {choices!r}")
    if "ground_truth" in record and not isinstance(record["ground_truth"], Mapping):
        problems.append(f"'ground_truth' must be a JSON object, got {type(record['ground_truth']).__name__}")
    problems += _check_study_keys(record, images if images_ok else None)
    if check_files and images_ok:
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        for p in images:
            full = Path(p) if os.path.isabs(p) else base / p
            if not full.exists():
                problems.append(f"image {p!r} does not exist (looked for {full})")
        structures = record.get("report_structures")
        for k, entry in enumerate(structures if isinstance(structures, list) else []):
            mask = entry.get("mask") if isinstance(entry, Mapping) else None
            if isinstance(mask, str) and mask:
                full = Path(mask) if os.path.isabs(mask) else base / mask
                if not full.exists():
                    problems.append(f"'report_structures'[{k}].mask {mask!r} does not exist (looked for {full})")
    if isinstance(record, Mapping) and images_ok:
        from radfm3d.data.image_meta import check_image_fields

        problems += check_image_fields(record)
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_study_keys(record: Mapping[str, Any], images: list[str] | None) -> list[str]:
    """Problems of ``study_id``, ``patient_id``, ``image_modalities``, ``report_structures`` and ``labels``."""
    problems: list[str] = []
    for key in _ID_KEYS:
        if key in record and (not isinstance(record[key], str) or not record[key].strip()):
            problems.append(f"'{key}' must be a non-empty string, got {record[key]!r}")
    if "image_modalities" in record:
        mods = record["image_modalities"]
        if not isinstance(mods, list) or not all(isinstance(m, str) and m.strip() for m in mods):
            problems.append(f"'image_modalities' must be a list of non-empty strings, got {mods!r}")
        elif images is not None and len(mods) != len(images):
            problems.append(f"'image_modalities' has {len(mods)} entries but 'images' lists {len(images)} image(s)")
    if "report_structures" in record:
        structures = record["report_structures"]
        if not isinstance(structures, list):
            problems.append(f"'report_structures' must be a list of objects, got {type(structures).__name__}")
        else:
            for k, entry in enumerate(structures):
                problems += [f"'report_structures'[{k}]{p}" for p in _structure_problems(entry)]
    if "labels" in record:
        labels = record["labels"]
        if not isinstance(labels, Mapping):
            problems.append(f"'labels' must be a JSON object of class name -> 0 or 1, got {type(labels).__name__}")
        else:
            for name, value in labels.items():
                if not isinstance(name, str) or not name.strip():
                    problems.append(f"'labels' has an empty or non-string class name {name!r}")
                elif isinstance(value, bool) or value not in (0, 1):
                    problems.append(f"'labels'[{name!r}] must be 0 or 1, got {value!r}")
    return problems


def _structure_problems(entry: Any) -> list[str]:
    """Problems of one ``report_structures`` entry, each starting with what follows ``'report_structures'[k]``."""
    if not isinstance(entry, Mapping):
        return [f" must be an object, got {type(entry).__name__}"]
    problems: list[str] = []
    for key in ("text", "structure"):
        if key not in entry:
            problems.append(f" is missing {key!r}")
        elif not isinstance(entry[key], str) or not entry[key].strip():
            problems.append(f".{key} must be a non-empty string, got {entry[key]!r}")
    unknown = sorted(set(entry) - set(_STRUCTURE_KEYS))
    if unknown:
        problems.append(f" has unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(_STRUCTURE_KEYS)})")
    if "box_world_mm" in entry:
        box = entry["box_world_mm"]
        if not isinstance(box, list) or len(box) != 6 or not all(_is_number(v) for v in box):
            problems.append(f".box_world_mm must be 6 finite numbers [x1, y1, z1, x2, y2, z2] (RAS mm), got {box!r}")
        elif any(box[a] > box[a + 3] for a in range(3)):
            problems.append(f".box_world_mm must have x1 <= x2, y1 <= y2, z1 <= z2, got {box!r}")
    if "mask" in entry and (not isinstance(entry["mask"], str) or not entry["mask"]):
        problems.append(f".mask must be a non-empty path string, got {entry['mask']!r}")
    if "mask_label" in entry:
        label = entry["mask_label"]
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            problems.append(f".mask_label must be an integer >= 0, got {label!r}")
        elif "mask" not in entry:
            problems.append(" has 'mask_label' without 'mask'")
    return problems


def _decode_line(raw: bytes, lineno: int) -> tuple[Any, str | None]:
    """One raw JSONL line -> (object, None) or (None, problem). Never raises for bad content."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as "
                      "UTF-8")
    if lineno == 1 and text.startswith("\ufeff"):  # a UTF-8 byte-order mark some editors write
        text = text[1:]
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deeply to read (hundreds of levels of [ or {)"
    except ValueError as exc:  # e.g. an integer literal longer than Python's int-conversion limit
        return None, f"invalid JSON ({exc})"


def _iter_lines(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    """(line number, decoded object or None, problem or None) for every non-blank line.

    The file is read as bytes and each line decoded on its own, so a non-UTF-8 byte is reported with its line
    number (and the other lines are still checked); json's ``RecursionError`` on deeply nested input is a problem
    of that line, not a crash."""
    for lineno, raw in _raw_lines(path):
        obj, problem = _decode_line(raw, lineno)
        yield lineno, obj, problem


def _raw_lines(path: Path) -> Iterable[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of every non-blank line, streamed; an unreadable file is named."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise RadFM3DInputError(path, f"cannot be read ({exc.strerror or exc})") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                yield lineno, raw


def iter_jsonl(path: str | os.PathLike, *, objects_only: bool = True,
               allow_partial_last_line: bool = False) -> Iterable[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file, streaming.

    The first bad line raises ``RadFM3DInputError(path, "line N: problem")``: not UTF-8, invalid JSON, nested too
    deeply, or (``objects_only``) not a JSON object. ``allow_partial_last_line``: a final line without its newline
    that does not parse is skipped instead (what a killed writer of an append-only JSONL leaves behind).
    """
    path = Path(path)
    if not path.is_file():
        raise RadFM3DInputError(path, "file not found" if not path.exists() else "not a file")
    for lineno, raw in _raw_lines(path):
        if allow_partial_last_line and not raw.endswith(b"\n") and _decode_line(raw, lineno)[1] is not None:
            return  # only the last line of a file can lack its newline
        yield _checked(path, lineno, raw, objects_only)


def _checked(path: Path, lineno: int, raw: bytes, objects_only: bool) -> tuple[int, Any]:
    obj, problem = _decode_line(raw, lineno)
    if problem is None and objects_only and not isinstance(obj, dict):
        problem = f"expected a JSON object, found {type(obj).__name__}"
    if problem is not None:
        raise RadFM3DInputError(path, f"line {lineno}: {problem}")
    return lineno, obj


def read_jsonl(path: str | os.PathLike, *, objects_only: bool = True,
               allow_partial_last_line: bool = False) -> list[Any]:
    """All values of a JSONL file (blank lines skipped), in order: :func:`iter_jsonl` as a list.

    The one JSONL reader of radfm3d (manifests, predictions, cases files): errors are ``RadFM3DInputError`` naming
    the file and the line (not UTF-8, invalid JSON, nested too deeply, not an object)."""
    return [obj for _, obj in iter_jsonl(path, objects_only=objects_only,
                                         allow_partial_last_line=allow_partial_last_line)]


def validate_manifest(source: str | os.PathLike | Sequence[Mapping[str, Any]], *, check_files: bool = False,
                      raise_on_error: bool = True, max_errors: int = 20, require_prompt: bool = True) -> list[str]:
    """Check a manifest file (or a list of records); errors read ``"line N: problem"``.

    Args:
        source: path of a ``.jsonl`` file, or records (then "line N" is the 1-based record number).
        check_files: check that the image paths exist (relative to the manifest's folder).
        require_prompt: see :func:`validate_record` (False for image-report pairs).
        raise_on_error: raise ``RadFM3DInputError(path, all problems)`` instead of returning them.
        max_errors: at most this many problems are reported (the count of the rest is added).

    Returns:
        the list of problems (empty when valid).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise RadFM3DInputError(path, "manifest file does not exist")
        base_dir: Path | None = path.parent
        entries: Iterable[tuple[int, Any, str | None]] = _iter_lines(path)
        name = str(path)
    else:
        base_dir, name = None, "manifest"
        entries = ((i, rec, None) for i, rec in enumerate(source, start=1))
    errors: list[str] = []
    seen: dict[str, int] = {}
    study_patient: dict[str, tuple[str, int]] = {}
    for lineno, rec, json_problem in entries:
        problems = [json_problem] if json_problem else validate_record(rec, base_dir=base_dir,
                                                                        check_files=check_files,
                                                                        require_prompt=require_prompt)
        if not json_problem and isinstance(rec, Mapping) and isinstance(rec.get("id"), str):
            if rec["id"] in seen:
                problems.append(f"duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
            else:
                seen[rec["id"]] = lineno
        if not json_problem and isinstance(rec, Mapping) and isinstance(rec.get("study_id"), str) \
                and isinstance(rec.get("patient_id"), str):
            first = study_patient.setdefault(rec["study_id"], (rec["patient_id"], lineno))
            if first[0] != rec["patient_id"]:
                problems.append(f"study_id {rec['study_id']!r} has patient_id {rec['patient_id']!r} here but "
                                f"{first[0]!r} on line {first[1]} (one study belongs to one patient)")
        errors += [f"line {lineno}: {p}" for p in problems]
    if len(errors) > max_errors:
        errors = errors[:max_errors] + [f"... and {len(errors) - max_errors} more problem(s)"]
    if errors and raise_on_error:
        raise RadFM3DInputError(name, "invalid manifest:\n  " + "\n  ".join(errors))
    return errors


def check_patient_splits(splits: Mapping[str, str | os.PathLike | Sequence[Mapping[str, Any]]], *,
                         raise_on_error: bool = True, max_errors: int = 20) -> list[str]:
    """Check that no ``patient_id`` (and no ``study_id``) has records in two splits.

    Args:
        splits: split name -> manifest path or records (e.g. ``{"train": "train.jsonl", "test": "test.jsonl"}``).
        raise_on_error: raise ``RadFM3DInputError`` naming the manifests and every shared patient.

    Returns:
        problems such as ``"patient_id 'p7' is in train (train.jsonl line 3) and test (test.jsonl line 9)"``
        (empty when the splits are disjoint). Records without the key are not checked.
    """
    first: dict[tuple[str, str], tuple[str, str]] = {}   # (key, value) -> (split, where)
    clashes: dict[tuple[str, str], dict[str, str]] = {}
    for split, source in splits.items():
        if isinstance(source, (str, os.PathLike)):
            name = Path(source).name
            rows: Iterable[tuple[int, Any]] = iter_jsonl(source)
        else:
            name = str(split)
            rows = enumerate(source, start=1)
        for lineno, rec in rows:
            if not isinstance(rec, Mapping):
                continue
            for key in _ID_KEYS:
                value = rec.get(key)
                if not isinstance(value, str):
                    continue
                where = f"{name} line {lineno}"
                seen_split, seen_where = first.setdefault((key, value), (split, where))
                if seen_split != split:
                    clashes.setdefault((key, value), {seen_split: seen_where}).setdefault(split, where)
    errors = [f"{key} {value!r} is in " + " and ".join(f"{s} ({w})" for s, w in found.items())
              for (key, value), found in clashes.items()]
    if len(errors) > max_errors:
        errors = errors[:max_errors] + [f"... and {len(errors) - max_errors} more"]
    if errors and raise_on_error:
        raise RadFM3DInputError(", ".join(str(s) for s in splits.values() if isinstance(s, (str, os.PathLike)))
                                or "manifests", "records of one patient or study in two splits:\n  "
                                + "\n  ".join(errors))
    return errors


def read_manifest(path: str | os.PathLike, *, validate: bool = True, check_files: bool = False,
                  require_prompt: bool = True) -> list[dict]:
    """Records of a JSONL manifest, in file order (blank lines skipped).

    Image paths are returned as written (relative to the manifest's folder); see :func:`resolve_images`.
    Raises ``RadFM3DInputError`` naming the file and each bad line when ``validate`` finds problems
    (``require_prompt``: see :func:`validate_record`).
    """
    path = Path(path)
    if not path.is_file():
        raise RadFM3DInputError(path, "manifest file does not exist")
    if validate:
        validate_manifest(path, check_files=check_files, require_prompt=require_prompt)
    return read_jsonl(path, objects_only=False)


def write_manifest(records: Iterable[Mapping[str, Any]], path: str | os.PathLike, *,
                   validate: bool = True) -> Path:
    """Write records as JSONL atomically (temp file in the same folder, then ``os.replace``).

    Returns the path written. With ``validate`` the records are checked first (nothing is written if invalid).
    """
    records = list(records)
    if validate:
        validate_manifest(records)
    return write_jsonl(records, path)


def write_jsonl(records: Iterable[Any], path: str | os.PathLike) -> Path:
    """Write JSON objects one per line, atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for number, rec in enumerate(records, start=1):
                fh.write(_json_line(rec, path, number))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class ManifestWriter:
    """Streaming, atomic JSONL writer for manifests too large to hold in memory.

    Records are validated one by one (``validate=True``; ids must be unique) and written to a hidden temporary
    file in the target folder, which replaces ``path`` only on a clean ``close()`` / ``with`` exit; on an
    exception the temporary file is removed and ``path`` is left untouched::

        with ManifestWriter(out / "train.jsonl") as w:
            for rec in records:
                w.write(rec)
    """

    def __init__(self, path: str | os.PathLike, *, validate: bool = True) -> None:
        self.path = Path(path)
        self.validate = validate
        self.count = 0
        self._ids: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._fh = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (raises ``RadFM3DInputError`` naming the record number if it is invalid)."""
        self.count += 1
        if self.validate:
            problems = validate_record(record)
            rid = record.get("id") if isinstance(record, Mapping) else None
            if isinstance(rid, str):
                if rid in self._ids:
                    problems.append(f"duplicate id {rid!r}")
                self._ids.add(rid)
            if problems:
                raise RadFM3DInputError(self.path, f"record {self.count}: " + "; ".join(problems))
        self._fh.write(_json_line(record, self.path, self.count))

    def close(self) -> Path:
        """Finish: move the temporary file onto ``path``."""
        if not self._fh.closed:
            self._fh.close()
            os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far (``path`` is not touched)."""
        if not self._fh.closed:
            self._fh.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def resolve_images(record: Mapping[str, Any], manifest_path: str | os.PathLike) -> list[Path]:
    """Absolute image paths of a record (relative paths are relative to the manifest's folder)."""
    base = Path(manifest_path).parent
    return [Path(p) if os.path.isabs(p) else (base / p) for p in record.get("images", [])]


def sample_by_task(records: Sequence[Mapping[str, Any]], counts: Mapping[str, int], seed: int = 0) -> list[dict]:
    """A task-balanced random subset: up to ``counts[task]`` records of each task, shuffled together.

    Used to build a training mix that fits a compute budget (e.g. the CPU-trained demo model) while keeping every
    case's images eligible; deterministic for a given seed. Tasks absent from ``counts`` are dropped.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_task.setdefault(str(record.get("task")), []).append(record)
    chosen: list[dict] = []
    for task in sorted(counts):
        pool = by_task.get(task, [])
        take = min(int(counts[task]), len(pool))
        chosen += [dict(pool[i]) for i in rng.choice(len(pool), size=take, replace=False)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def parse_task_counts(text: str) -> dict[str, int]:
    """``"report=150,grounding=190"`` -> ``{"report": 150, "grounding": 190}`` (a ``ValueError`` names a bad entry)."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, sep, value = item.partition("=")
        try:
            number = int(value)
        except ValueError:
            number = -1
        if not sep or not task.strip() or number < 0:
            raise ValueError(f"bad task count {item!r}: expected task=N with N >= 0, e.g. report=150")
        if task.strip() in counts:
            raise ValueError(f"task {task.strip()!r} is given twice")
        counts[task.strip()] = number
    if not counts:
        raise ValueError("no task counts given (expected e.g. report=150,grounding=190)")
    return counts


def scale_task_mix(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Per-task counts proportional to ``weights`` that add up to about ``total`` (each rounded up, so at least
    ``total``); used to size a training mix to a compute budget (iterations x batch size)."""
    weight_sum = float(sum(weights.values()))
    if weight_sum <= 0 or total < 0:
        raise ValueError(f"need positive weights and total >= 0, got weights summing to {weight_sum} and {total}")
    return {task: math.ceil(float(w) * total / weight_sum) for task, w in weights.items()}


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d sample-tasks MANIFEST --counts task=N,... --out OUT``: a task-balanced training or test mix."""
    import argparse
    import sys
    from collections import Counter

    parser = argparse.ArgumentParser(prog="radfm3d sample-tasks", description=(
        "Write a random, task-balanced subset of a manifest (sample_by_task): up to N records of each named task, "
        "shuffled together; tasks not named are dropped. With --total the counts are weights scaled to that many "
        "records (e.g. iterations x batch size of the time you have)."))
    parser.add_argument("manifest", help="input JSONL manifest (e.g. data/phantoms/train.jsonl)")
    parser.add_argument("--counts", required=True, help="task=N pairs, comma-separated (e.g. report=150,grounding=190)")
    parser.add_argument("--total", type=int, default=None, help="scale the counts (as weights) to this many records")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output JSONL manifest (written atomically)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        counts = parse_task_counts(args.counts)
        if args.total is not None:
            counts = scale_task_mix(counts, args.total)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        source = read_manifest(args.manifest)
    except RadFM3DInputError as exc:
        print(f"radfm3d sample-tasks: {exc}", file=sys.stderr)
        return 2
    records = sample_by_task(source, counts, seed=args.seed)
    out = Path(args.out)
    if out.resolve().parent != Path(args.manifest).resolve().parent:
        # image paths are relative to the manifest's folder: keep them valid from the new location
        source_path = Path(args.manifest).resolve()
        for record in records:
            record["images"] = [str(p) for p in resolve_images(record, source_path)]
    write_manifest(records, out)
    per_task = Counter(str(r.get("task")) for r in records)
    short = {t: f"{per_task.get(t, 0)}/{n}" for t, n in counts.items() if per_task.get(t, 0) < n}
    print(json.dumps({"records": len(records), "per_task": dict(sorted(per_task.items())),
                      "fewer_than_asked": short, "out": str(out)}))
    return 0
