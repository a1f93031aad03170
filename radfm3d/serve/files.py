# Copyright (c) radfm3d contributors. Apache-2.0.
"""Uploaded scans for the server: one private folder per file, owned by the API key that uploaded it, expiring.

A file is a single NIfTI / NRRD / MHA (one file, no detached data) or a zip of one DICOM series. Every upload is
read once with :func:`radfm3d.io.load_image` (header voxel budget checked before decoding) so a bad file is refused
at upload time with the reader's own message; a zip is checked entry by entry (no absolute or ``..`` names, no
symlinks, bounded entry count and decompressed size, the size counted while extracting rather than trusted from the
zip header) before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from radfm3d.errors import RadFM3DInputError

__all__ = ["FileLimits", "StoredFile", "FileStore", "scan_kind", "safe_extract_zip", "check_attached_data",
           "geometry_summary", "owner_of"]

#: accepted upload names (lower-case suffix) -> kind
_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha", ".zip": "dicom-zip"}
_ID = re.compile(r"^file-[0-9a-f]{24}$")


@dataclass
class FileLimits:
    """Bounds on what one client may store. Sizes in bytes, ``ttl_s`` in seconds."""

    max_upload_bytes: int = 512 * 2**20
    max_voxels: int = 200_000_000
    max_read_bytes: int = 4 * 2**30  # memory one read may take (load_image's max_bytes, checked from the header)
    max_zip_entries: int = 2000
    max_unzipped_bytes: int = 2 * 2**30
    max_files_per_owner: int = 64
    max_bytes_per_owner: int = 4 * 2**30
    ttl_s: float = 3600.0

    def read_kwargs(self) -> dict[str, int]:
        """The :func:`radfm3d.io.load_image` budgets of a server read."""
        return {"max_voxels": int(self.max_voxels), "max_bytes": int(self.max_read_bytes),
                "max_files": int(self.max_zip_entries)}


@dataclass
class StoredFile:
    """One uploaded scan. ``path`` is the file (or the extracted DICOM folder) on the server's disk."""

    id: str
    owner: str
    filename: str
    bytes: int
    created_at: int
    expires_at: float
    path: Path
    geometry: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """OpenAI's file object plus ``expires_at`` and the scan's ``geometry`` (no server path)."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "expires_at": int(self.expires_at), "filename": self.filename, "purpose": "vision",
                "status": "processed", "geometry": self.geometry}


def owner_of(api_key: str | None) -> str:
    """Owner tag of an API key (a hash, so keys are never kept in memory beside the files)."""
    return "anonymous" if not api_key else hashlib.sha256(api_key.encode()).hexdigest()[:32]


def scan_kind(filename: str) -> str:
    """``"nifti"``, ``"nrrd"``, ``"mha"`` or ``"dicom-zip"`` from an upload's name; refuses anything else."""
    name = filename.lower()
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    raise RadFM3DInputError(filename, "unsupported upload: send a .nii/.nii.gz, .nrrd (attached data), .mha or a "
                                      ".zip of one DICOM series")


def safe_extract_zip(archive: Path, dest: Path, *, max_entries: int, max_total_bytes: int,
                     name: str | None = None) -> int:
    """Extract ``archive`` into ``dest`` refusing absolute names, ``..``, symlinks and other non-regular entries,
    more than ``max_entries`` files or more than ``max_total_bytes`` decompressed (errors name ``name``, default the
    archive's file name). Returns the file count.

    Written here rather than with ``ZipFile.extractall`` because extractall silently rewrites unsafe names instead of
    refusing them, and trusts the sizes written in the zip header (a zip bomb can lie about them).
    """
    name = name or archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise RadFM3DInputError(name, f"not a readable zip archive ({err})") from err
    with zf:
        infos = zf.infolist()
        files = [i for i in infos if not i.is_dir()]
        if len(files) > max_entries:
            raise RadFM3DInputError(name, f"{len(files)} entries; at most {max_entries} are accepted")
        for info in infos:
            member = info.filename.replace("\\", "/")
            parts = PurePosixPath(member).parts
            if member.startswith("/") or re.match(r"^[A-Za-z]:", member) or ".." in parts:
                raise RadFM3DInputError(name, f"unsafe entry name {info.filename!r} (absolute or '..')")
            kind = stat.S_IFMT((info.external_attr >> 16) & 0xFFFF)  # 0: the zip does not say (plain file)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise RadFM3DInputError(name, f"entry {info.filename!r} is a symlink or special file")
            if info.flag_bits & 0x1:
                raise RadFM3DInputError(name, f"entry {info.filename!r} is encrypted")
        total = 0
        count = 0
        for k, info in enumerate(files):
            # flat, generated names: the series is found by content, and nothing the client wrote becomes a path
            target = dest / f"{k:05d}_{re.sub(r'[^A-Za-z0-9._-]', '_', PurePosixPath(info.filename).name)[-64:]}"
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_total_bytes:
                            raise RadFM3DInputError(name, f"decompresses to more than {max_total_bytes} bytes")
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
                raise RadFM3DInputError(name, f"entry {info.filename!r} cannot be read ({err})") from err
            count += 1
    if count == 0:
        raise RadFM3DInputError(name, "the zip holds no files; send a zip of one DICOM series")
    return count


def check_attached_data(path: Path, kind: str, name: str) -> None:
    """Refuse a NRRD or MHA header that points at a separate data file (``data file:`` / ``ElementDataFile`` other
    than ``LOCAL``): on a server that would make the reader open a file of the server's choosing, not the upload."""
    if kind not in ("nrrd", "mha"):
        return
    with open(path, "rb") as fh:
        head = fh.read(256 * 1024)
    lines = head.split(b"\n")
    for raw in lines:
        line = raw.strip().lower()
        if kind == "nrrd":
            if not line:  # the blank line ends a NRRD header
                return
            key = line.split(b":", 1)[0].strip()
            if key in (b"data file", b"datafile"):
                raise RadFM3DInputError(name, "the NRRD header names a separate data file; upload a single-file "
                                              "NRRD (attached data)")
        elif line.startswith(b"elementdatafile"):
            value = line.split(b"=", 1)[1].strip() if b"=" in line else b""
            if value != b"local":
                raise RadFM3DInputError(name, "the MHA header names a separate data file; upload a single-file "
                                              "MHA (ElementDataFile = LOCAL)")
            return
    if kind == "mha":
        raise RadFM3DInputError(name, "no ElementDataFile = LOCAL in the first 256 KiB: not a single-file MHA")


def geometry_summary(image: Any) -> dict[str, Any]:
    """Shape, spacing (mm), orientation codes, origin (RAS mm), the voxel -> RAS affine, modality and format of a
    loaded scan (:func:`radfm3d.io.image_summary` without the server's path)."""
    import numpy as np

    from radfm3d.io import image_summary

    summary = image_summary(image)
    summary.pop("file", None)
    summary["affine_ras"] = np.asarray(image.affine, dtype=np.float64).round(6).tolist()
    summary["spatial_shape"] = [int(s) for s in image.shape[1:]]
    return summary


class FileStore:
    """Uploaded scans under one private temporary folder, per owner, expiring after ``limits.ttl_s``.

    Thread-safe; unknown, expired and other owners' ids all read as "not found" (no existence leak).
    """

    def __init__(self, limits: FileLimits | None = None, root: str | os.PathLike | None = None) -> None:
        self.limits = limits or FileLimits()
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="radfm3d-serve-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._files: dict[str, StoredFile] = {}
        self._lock = threading.Lock()
        self.on_remove: list[Any] = []  # callbacks(file_id) run when a file is deleted or expires

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Forget every file and remove the folder when the store made it."""
        with self._lock:
            ids = list(self._files)
            self._files.clear()
        for file_id in ids:
            self._notify(file_id)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _notify(self, file_id: str) -> None:
        for callback in self.on_remove:
            callback(file_id)

    def purge_expired(self, now: float | None = None) -> int:
        """Remove expired files; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [f for f in self._files.values() if f.expires_at <= now]
            for f in gone:
                del self._files[f.id]
        for f in gone:
            shutil.rmtree(f.path.parent, ignore_errors=True)
            self._notify(f.id)
        return len(gone)

    # ------------------------------------------------------------------ access
    def get(self, file_id: str, owner: str) -> StoredFile | None:
        """The owner's live file, else ``None``."""
        self.purge_expired()
        if not isinstance(file_id, str) or not _ID.match(file_id):
            return None
        with self._lock:
            f = self._files.get(file_id)
        return f if f is not None and secrets.compare_digest(f.owner, owner) else None

    def list(self, owner: str) -> list[StoredFile]:
        """The owner's live files, oldest first."""
        self.purge_expired()
        with self._lock:
            return [f for f in self._files.values() if f.owner == owner]  # insertion order = upload order

    def delete(self, file_id: str, owner: str) -> bool:
        """Delete the owner's file; ``False`` when there is none."""
        f = self.get(file_id, owner)
        if f is None:
            return False
        with self._lock:
            self._files.pop(file_id, None)
        shutil.rmtree(f.path.parent, ignore_errors=True)
        self._notify(file_id)
        return True

    # ------------------------------------------------------------------ upload
    def new_slot(self, owner: str) -> tuple[str, Path]:
        """A fresh id and an empty private folder for it; refuses an owner already at the file limit."""
        self.purge_expired()
        with self._lock:
            n = sum(1 for f in self._files.values() if f.owner == owner)
        if n >= self.limits.max_files_per_owner:
            raise RadFM3DInputError("upload", f"{n} files stored for this key (the limit); delete some first")
        file_id = "file-" + secrets.token_hex(12)
        folder = self.root / file_id
        folder.mkdir(mode=0o700)
        return file_id, folder

    def add(self, file_id: str, folder: Path, owner: str, filename: str, upload: Path) -> StoredFile:
        """Validate the uploaded bytes at ``upload`` (inside ``folder``) and register them.

        Raises :class:`RadFM3DInputError` (and removes ``folder``) when the scan cannot be read.
        """
        from radfm3d.io import load_image

        try:
            kind = scan_kind(filename)
            size = upload.stat().st_size
            if size == 0:
                raise RadFM3DInputError(filename, "empty upload")
            if kind == "dicom-zip":
                series = folder / "series"
                series.mkdir()
                safe_extract_zip(upload, series, max_entries=self.limits.max_zip_entries,
                                 max_total_bytes=self.limits.max_unzipped_bytes, name=filename)
                upload.unlink()
                path = series
            else:
                path = folder / ("scan" + next(s for s in _SUFFIXES if filename.lower().endswith(s)))
                upload.rename(path)
                check_attached_data(path, kind, filename)
            try:
                image = load_image(path, **self.limits.read_kwargs())
            except RadFM3DInputError as err:  # the reader names the server's temp path: name the upload instead
                raise RadFM3DInputError(filename, err.problem) from None
            geometry = geometry_summary(image)
            del image
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            used = sum(f.bytes for f in self._files.values() if f.owner == owner)
        if used + size > self.limits.max_bytes_per_owner:
            shutil.rmtree(folder, ignore_errors=True)
            raise RadFM3DInputError(filename, f"this key already stores {used} bytes; with this upload it would pass "
                                              f"the limit of {self.limits.max_bytes_per_owner} bytes: delete some "
                                              "files first")
        now = time.time()
        stored = StoredFile(id=file_id, owner=owner, filename=filename, bytes=int(size), created_at=int(now),
                            expires_at=now + self.limits.ttl_s, path=path, geometry=geometry)
        with self._lock:
            self._files[file_id] = stored
        return stored
