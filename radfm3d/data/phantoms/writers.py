# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadPhantom writers: case volumes (NIfTI, DICOM series), per-case sidecars and the dataset manifests.

Output layout under a set's folder ``out``::

    images/shard-000/case-000123.nii.gz          current scan (int16; HU for CT, a.u. for MR)
    images/shard-000/case-000123-prior.nii.gz    prior scan (comparison cases only)
    dicom/shard-000/case-000123/slice_0000.dcm   DICOM series copy (a ``dicom_fraction`` of cases)
    meta/shard-000/case-000123.json              per-case sidecar (ground truth + task records) = done marker
    images/shard-000/study-000123-ct.nii.gz      multi-series study (``--studies``): one NIfTI per series
    images/shard-000/study-000123-mr-t1.nii.gz     (-ct, -mr-t1, -mr-t2), sidecar meta/shard-000/study-000123.json
    train.jsonl / val.jsonl / test.jsonl         task manifests (CONTRACTS.md format; studies' records after cases')
    cases.jsonl                                  ground truth per case
    studies.jsonl                                ground truth per multi-series study (only with studies)

Every file is written under a hidden temporary name in its final folder (``.<stem>.tmp-<pid><suffix>``) and
moved into place with ``os.replace``. The temporary keeps the final suffix because the NIfTI writer picks the
format from it, and carries the ``.tmp-`` tag so :func:`cleanup_temporaries` can find what an interrupted run
left (``radfm3d.utils.atomic_write`` names its temporaries ``*.tmp`` and keeps no suffix, hence these helpers).

The same seed gives byte-identical files: NIfTI headers carry no time, and every DICOM UID (study, series,
frame of reference, each slice's SOP instance) is derived from ``(seed, case index)``; no dates or times are
written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from radfm3d.data.phantoms.anatomy import SPLITS
from radfm3d.data.phantoms.render import PhantomScan

__all__ = ["case_paths", "study_paths", "write_volume_nifti", "write_volume_dicom", "write_json_atomic",
           "cleanup_temporaries", "write_manifests", "dicom_uid"]

_TMP_TAG = ".tmp-"
_SHARD_SIZE = 1000


def case_paths(index: int) -> dict[str, str]:
    """Relative output paths of case ``index`` (sharded by 1000)."""
    shard = f"shard-{index // _SHARD_SIZE:03d}"
    cid = f"case-{index:06d}"
    return {"nifti": f"images/{shard}/{cid}.nii.gz", "prior": f"images/{shard}/{cid}-prior.nii.gz",
            "dicom": f"dicom/{shard}/{cid}", "sidecar": f"meta/{shard}/{cid}.json"}


def study_paths(index: int, series: Iterable[tuple[str, str | None]]) -> dict[str, Any]:
    """Relative output paths of multi-series study ``index``: ``series`` (one NIfTI per series, e.g.
    ``images/shard-000/study-000123-mr-t1.nii.gz``) and ``sidecar``."""
    shard = f"shard-{index // _SHARD_SIZE:03d}"
    sid = f"study-{index:06d}"
    names = [f"{mod}-{seq}".lower() if seq else mod.lower() for mod, seq in series]
    return {"series": [f"images/{shard}/{sid}-{name}.nii.gz" for name in names],
            "sidecar": f"meta/{shard}/{sid}.json"}


def _tmp_name(final: Path) -> Path:
    """Hidden temporary sibling of ``final`` (same folder, same suffixes so writers pick the format)."""
    suffix = "".join(final.suffixes) if final.name.endswith(".nii.gz") else final.suffix
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    return final.with_name(f".{stem}{_TMP_TAG}{os.getpid()}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _int16_image(scan: PhantomScan) -> Any:
    """MetaTensor (1, X, Y, Z) int16 of a scan (its values are already integers in int16 range)."""
    import torch
    from monai.data import MetaTensor

    data = scan.array.astype(np.int16)[None]
    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(scan.affine, dtype=torch.float64))


def write_volume_nifti(scan: PhantomScan, final: Path) -> None:
    """Write ``scan`` as an int16 NIfTI at ``final`` (atomic)."""
    from radfm3d.io import save_nifti

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    image = _int16_image(scan)
    try:
        save_nifti(image, tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def dicom_uid(seed: int, index: int, kind: int | str) -> str:
    """Deterministic DICOM UID under the 2.25 (UUID-derived) root: 0 = study, 1 = series, ``"frame"`` = frame of
    reference, ``"slice-<k>"`` = SOP instance of slice k."""
    digest = hashlib.sha256(f"radphantom:{seed}:{index}:{kind}".encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def _fix_instance_uids(paths: Iterable[Path], seed: int, index: int) -> None:
    """Replace the random frame-of-reference and SOP instance UIDs that ``radfm3d.io.save_dicom_series`` draws by
    UIDs derived from ``(seed, index)`` (that writer takes only the study and series UIDs as arguments)."""
    import pydicom

    frame_uid = dicom_uid(seed, index, "frame")
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        sop_uid = dicom_uid(seed, index, f"slice-{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.save_as(path, enforce_file_format=True)


def write_volume_dicom(scan: PhantomScan, final: Path, seed: int, index: int) -> None:
    """Write ``scan`` as a DICOM series folder ``final`` (one file per slice; the folder appears atomically)."""
    from radfm3d.io import save_dicom_series

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    _remove(tmp)
    try:
        paths = save_dicom_series(_int16_image(scan), tmp, modality=scan.modality,
                                  series_uid=dicom_uid(seed, index, 1), study_uid=dicom_uid(seed, index, 0),
                                  patient_id=f"PHANTOM-{seed}-{index:06d}", description=f"RadPhantom case {index}")
        _fix_instance_uids(paths, seed, index)
        _remove(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_json_atomic(obj: Any, final: Path) -> None:
    """Compact JSON at ``final`` (atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, separators=(",", ":"))
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def cleanup_temporaries(out: Path) -> int:
    """Remove half-written temporary files/folders left by an interrupted run; returns how many."""
    removed = 0
    for top in ("images", "dicom", "meta"):
        root = out / top
        if not root.is_dir():
            continue
        stack = [root]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                for entry in it:
                    if entry.name.startswith(".") and _TMP_TAG in entry.name:
                        _remove(Path(entry.path))
                        removed += 1
                    elif entry.is_dir(follow_symlinks=False) and not entry.name.startswith("case-"):
                        stack.append(Path(entry.path))
    for entry in out.glob(f".*{_TMP_TAG}*"):
        _remove(entry)
        removed += 1
    return removed


def write_manifests(out: Path, indices: Iterable[int], study_sidecars: Iterable[str] = ()
                    ) -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
    """Assemble ``train/val/test.jsonl`` and ``cases.jsonl`` from the sidecars of ``indices`` (in that order),
    streaming, so it scales to 100k+ cases; multi-series studies (``study_sidecars``, relative paths) add their
    records to the split manifests after the cases' and their ground truth to ``studies.jsonl``. Returns
    (manifest paths, cases (and studies) per split, records per split)."""
    from radfm3d.data.manifest import ManifestWriter

    study_sidecars = list(study_sidecars)
    writers = {name: ManifestWriter(out / f"{name}.jsonl") for name, _ in SPLITS}
    writers["cases"] = ManifestWriter(out / "cases.jsonl", validate=False)
    if study_sidecars:
        writers["studies"] = ManifestWriter(out / "studies.jsonl", validate=False)
    split_counts = {name: 0 for name, _ in SPLITS}
    try:
        sidecars = [(case_paths(i)["sidecar"], "cases") for i in indices] + [(p, "studies") for p in study_sidecars]
        for sidecar, kind in sidecars:
            with open(out / sidecar, encoding="utf-8") as fh:
                meta = json.load(fh)
            gt = meta["ground_truth"]
            split_counts[gt["split"]] += 1
            for rec in meta["records"]:
                writers[gt["split"]].write(rec)
            writers[kind].write({"id": gt["case_id"], **gt})
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    manifests = {name: str(w.close()) for name, w in writers.items()}
    return manifests, split_counts, {name: writers[name].count for name, _ in SPLITS}
