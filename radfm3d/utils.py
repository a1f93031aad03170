# Copyright (c) radfm3d contributors. Apache-2.0.
"""Small helpers shared by several rooms (no imaging or model logic here)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first use of ``name``.

    Keeps ``import radfm3d.<room>`` light: torch, monai and transformers load only when a name needs them.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def progress_bar(total: int, enabled: bool = True, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar (``update``/``close``); a silent one when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, **tqdm_kwargs)


_TRUE, _FALSE, _NONE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"none", "null", ""}


def as_bool(value: Any, name: str = "flag") -> bool | None:
    """A command-line switch as a bool (None stays None).

    Why: ``python -m monai.bundle run --resume false`` hands the config the *string* "false" (python-fire only
    parses ``False``), which is truthy; bundle configs pass every switch through this instead.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in _NONE:
        return None
    raise ValueError(f"{name}: expected true/false, got {value!r}")


def is_unset(value: Any) -> bool:
    """True for an option switched off: None, an empty string or the word "none" (any case), as bundle and
    command-line overrides spell it."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` to a uniquely named temporary sibling of ``path``, then ``os.replace`` it into place.

    A write that raises (or a kill) leaves ``path`` as it was (the old file, or nothing) and no temporary file
    behind; never a 0-byte or half-written file under ``path``. The file gets the usual umask permissions
    (``mkstemp`` alone makes it 0600). The parent folder must exist.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_folder(partial: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move a finished folder ``partial`` onto ``out`` with ``os.replace`` (an existing ``out`` is moved aside
    first, then removed), so ``out`` is never half written. Both must be on one file system."""
    import shutil

    partial, out = Path(partial), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Write a folder atomically: yields an empty hidden sibling ``.<name>.partial-<pid>`` to fill; when the block
    ends normally it is published onto ``out`` (:func:`publish_folder`), on any error it is removed, so ``out`` is
    either the old folder or the finished new one, never half written."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
        publish_folder(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder that exists and can be written (created if missing; a probe file is made and removed).

    Meant to run before any work, so that a bad output folder is refused before hours of compute. Raises
    :class:`~radfm3d.errors.RadFM3DInputError` naming ``what`` when ``path`` is an existing file, cannot be created
    or cannot be written.
    """
    from radfm3d.errors import RadFM3DInputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RadFM3DInputError(path, f"{what} is an existing file; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise RadFM3DInputError(path, f"{what} cannot be written ({err.strerror or err})") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`), creating the parent folder; -> ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`), creating the parent folder; -> ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy/torch values (``.item()``/``.tolist()``) and objects with ``to_dict``."""
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """``obj`` as JSON (numpy/torch values via :func:`json_default`) written atomically to ``path``; -> ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def atomic_savefig(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` (matplotlib) to ``path`` atomically; the format comes from the suffix of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = savefig_kwargs.pop("format", None) or path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
    return path


class JsonlAppender:
    """Append JSON lines to a file that survives kills: each :meth:`write` is one complete line, flushed and
    fsync-ed before it returns, so a killed run loses at most the line being written.

    Opening repairs a torn tail left by an earlier kill (bytes after the last newline are cut off), so appended
    lines never join a half line. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = bool(fsync)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = _cut_torn_tail(self.path)
        self._fh: TextIO | None = self.path.open("a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` as one JSON line (numpy/torch values via :func:`json_default`)."""
        if self._fh is None:
            raise ValueError(f"{self.path}: appender is closed")
        self._fh.write(json.dumps(row, default=json_default) + "\n")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> int:
    """Truncate ``path`` after its last newline; -> the number of bytes cut (0 when the file is whole or absent)."""
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # scan back in blocks for the last newline
        pos, block = size, 65536
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                fh.truncate(keep)
                return size - keep
            pos = start
        fh.truncate(0)
        return size


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file, or ``RadFM3DInputError`` naming it (not UTF-8, invalid, nested too deeply, not an object)."""
    import json

    from radfm3d.errors import RadFM3DInputError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RadFM3DInputError(path, f"unreadable JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise RadFM3DInputError(path, f"expected a JSON object, found {type(data).__name__}")
    return data
