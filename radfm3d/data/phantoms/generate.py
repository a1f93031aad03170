# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadPhantom set generation: render and write many cases (in parallel, resumable) and the ``radfm3d phantoms``
command::

    summary = generate_phantoms(out_dir, n, seed)       # files + train/val/test.jsonl + cases.jsonl
    radfm3d phantoms --n 2000 --out DIR --seed 0 --workers 2

The files and their layout are described in :mod:`radfm3d.data.phantoms.writers`; besides them the set folder
holds ``preprocessing.json`` (the grid recipe the 0-99 text boxes use) and ``dataset.json`` (the run summary).

Resumability: a case is done when its sidecar exists, was made with the same settings and all the files it
lists exist; otherwise the whole case is rewritten. Leftover temporary files are removed on start.

Bad items: a case that fails (an exception while rendering or writing it) does not stop the others. Each failure
is recorded in ``dataset.json`` under ``failed`` (case, file being written, error) and the manifests hold only the
cases that were written; :func:`generate_phantoms` then raises :class:`PhantomGenerationError` (after every good
case and the manifests are written) and ``radfm3d phantoms`` prints the failures and exits with status 1. A rerun
regenerates only the missing cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from radfm3d.data.phantoms.anatomy import GENERATOR_VERSION
from radfm3d.data.phantoms.render import _S_STUDY_TEXT, _S_TEXT, STUDY_SERIES, render_case, render_study
from radfm3d.data.phantoms.tasks import STUDY_TASKS, TASKS, build_records, build_study_records
from radfm3d.data.phantoms.writers import (
    _remove, case_paths, cleanup_temporaries, study_paths, write_json_atomic, write_manifests, write_volume_dicom,
    write_volume_nifti,
)
from radfm3d.utils import progress_bar

__all__ = ["generate_phantoms", "generate_case_files", "generate_study_files", "PhantomGenerationError", "cli"]


class PhantomGenerationError(RuntimeError):
    """Some cases of a phantom set failed; ``summary`` is the run summary (``summary["failed"]`` lists them)."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def _run_config(seed: int, grid: Sequence[int] | None, dicom_fraction: float, prior_fraction: float,
                tasks: Sequence[str] | None, matrix: Sequence[int] = (96, 192), slices: Sequence[int] = (24, 64)
                ) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "grid": list(grid) if grid else None,
            "dicom_fraction": float(dicom_fraction), "prior_fraction": float(prior_fraction),
            "tasks": sorted(tasks) if tasks else None, "matrix": [int(v) for v in matrix],
            "slices": [int(v) for v in slices]}


def _study_config(config: dict[str, Any]) -> dict[str, Any]:
    """Settings of a run's multi-series studies (a case's settings plus the series)."""
    return {**config, "kind": "study", "series": [[mod, seq] for mod, seq in STUDY_SERIES]}


def _case_done(out: Path, index: int, config: dict[str, Any]) -> bool:
    """A case (or a study, with its config) is done when its sidecar exists, matches the run's settings and all its
    files exist."""
    study = config.get("kind") == "study"
    sidecar = out / (study_paths(index, STUDY_SERIES)["sidecar"] if study else case_paths(index)["sidecar"])
    if not sidecar.is_file():
        return False
    try:
        with open(sidecar, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("config") == config and all((out / f).exists() for f in meta.get("files", []))


def generate_case_files(out_dir: str | os.PathLike, seed: int, index: int, config: dict[str, Any],
                        step: list[str] | None = None) -> dict[str, Any]:
    """Render case ``index`` and write its volume(s), DICOM copy and sidecar (sidecar last). Returns a status.

    ``step``, when given, gets the relative path of each output as it is being written (so a caller can name the
    file a failure happened on)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    paths = case_paths(index)
    step = [] if step is None else step

    def at(key: str) -> Path:
        step.append(paths[key])
        return out / paths[key]

    _remove(at("sidecar"))  # a stale sidecar (other settings, missing files) must not outlive a failed rewrite
    step.append("rendering")
    scan, prior, gt = render_case(seed, index, grid=config["grid"], prior_fraction=config["prior_fraction"],
                                  dicom_fraction=config["dicom_fraction"], matrix=config["matrix"],
                                  slices=config["slices"])
    files = [paths["nifti"]]
    write_volume_nifti(scan, at("nifti"))
    image = paths["nifti"]
    if gt["dicom"]:
        write_volume_dicom(scan, at("dicom"), seed, index)
        files.append(paths["dicom"])
        image = paths["dicom"]  # the benchmark exercises the DICOM reader with these cases
    prior_path = None
    if prior is not None:
        write_volume_nifti(prior, at("prior"))
        files.append(paths["prior"])
        prior_path = paths["prior"]
    gt["images"] = {"image": image, "nifti": paths["nifti"], "dicom": paths["dicom"] if gt["dicom"] else None,
                    "prior": prior_path}
    step.append("task records")
    tasks = None if config["tasks"] is None else [t for t in config["tasks"] if t in TASKS]
    records = build_records(gt, [image], prior_path, rng=np.random.default_rng([seed, index, _S_TEXT]),
                            tasks=tasks)
    write_json_atomic({"config": config, "files": files, "ground_truth": gt, "records": records}, at("sidecar"))
    return {"index": index, "split": gt["split"], "seconds": time.perf_counter() - t0,
            "volumes": 1 + (prior is not None)}


def generate_study_files(out_dir: str | os.PathLike, seed: int, index: int, config: dict[str, Any],
                         step: list[str] | None = None) -> dict[str, Any]:
    """Render multi-series study ``index`` (:func:`radfm3d.data.phantoms.render.render_study`) and write one NIfTI
    per series and its sidecar (last). Returns a status; ``step`` as in :func:`generate_case_files`."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    series = [(mod, seq) for mod, seq in config["series"]]
    paths = study_paths(index, series)
    step = [] if step is None else step
    _remove(out / paths["sidecar"])
    step.append("rendering")
    scans, gt = render_study(seed, index, grid=config["grid"], matrix=config["matrix"], slices=config["slices"],
                             series=series)
    for scan, rel in zip(scans, paths["series"]):
        step.append(rel)
        write_volume_nifti(scan, out / rel)
    for entry, rel in zip(gt["series"], paths["series"]):
        entry["image"] = rel
    step.append("task records")
    tasks = None if config["tasks"] is None else [t for t in config["tasks"] if t in STUDY_TASKS]
    records = build_study_records(gt, paths["series"], rng=np.random.default_rng([seed, index, _S_STUDY_TEXT]),
                                  tasks=tasks)
    step.append(paths["sidecar"])
    write_json_atomic({"config": config, "files": list(paths["series"]), "ground_truth": gt, "records": records},
                      out / paths["sidecar"])
    return {"index": index, "split": gt["split"], "seconds": time.perf_counter() - t0, "volumes": len(scans)}


def _job(args: tuple[str, int, int, dict[str, Any]]) -> dict[str, Any]:
    """One case or study; an exception becomes a status with ``error`` (case, file being written, message)."""
    out_dir, seed, index, config = args
    study = config.get("kind") == "study"
    step: list[str] = []
    try:
        return (generate_study_files if study else generate_case_files)(out_dir, seed, index, config, step)
    except Exception as exc:  # noqa: BLE001 - one bad case must not cost the others; it is reported
        return {"index": index, "volumes": 0,
                "error": {"case": f"{'study' if study else 'case'}-{index:06d}", "file": step[-1] if step else None,
                          "error": f"{type(exc).__name__}: {exc}"}}


def generate_phantoms(out_dir: str | os.PathLike, n: int, seed: int = 0, *, workers: int = 1,
                      dicom_fraction: float = 0.1, prior_fraction: float = 0.25,
                      grid: Sequence[int] | None = (128, 128, 32), tasks: Sequence[str] | None = None,
                      matrix: Sequence[int] = (96, 192), slices: Sequence[int] = (24, 64),
                      progress: bool = True, studies: int = 0) -> dict[str, Any]:
    """Generate (or resume) a RadPhantom set of ``n`` cases under ``out_dir``; see the module docstring.

    Args:
        workers: parallel processes (1 = in this process).
        dicom_fraction: fraction of cases also written as a DICOM series (their manifests point to the series).
        prior_fraction: fraction of cases with a prior scan (comparison tasks).
        grid: model grid of the default PreprocessingRecipe for the 0-99 text boxes.
        tasks: subset of ``radfm3d.data.phantoms.tasks.TASKS`` and ``STUDY_TASKS`` (default all).
        matrix, slices: (min, max) in-plane matrix and slice count (see :func:`render_case`).
        studies: number of multi-series studies (CT, MR T1, MR T2 of one anatomy; ``study_report`` records,
            ground truth in ``studies.jsonl``) written besides the ``n`` cases; they draw from their own random
            streams, so the cases' files are the same with or without them.

    Returns:
        summary dict: n, seed, generated, skipped, failed, volumes, seconds, volumes_per_minute, cases per
        split, records per split, manifest paths.

    Raises:
        PhantomGenerationError: some cases failed; raised after all other cases, the manifests (of the cases
            written) and ``dataset.json`` are written.
    """
    if n < 0 or studies < 0:
        raise ValueError(f"n and studies must be >= 0, got {n} and {studies}")
    known = TASKS + STUDY_TASKS
    if tasks is not None and set(tasks) - set(known):
        raise ValueError(f"unknown task(s) {sorted(set(tasks) - set(known))}; known: {', '.join(known)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _run_config(seed, grid, dicom_fraction, prior_fraction, tasks, matrix, slices)
    study_config = _study_config(config)
    cleaned = cleanup_temporaries(out)
    todo = [i for i in range(n) if not _case_done(out, i, config)]
    todo_studies = [i for i in range(studies) if not _case_done(out, i, study_config)]
    t0 = time.perf_counter()
    volumes = 0
    failed: list[dict[str, Any]] = []
    bar = progress_bar(len(todo) + len(todo_studies), progress, desc="phantoms", unit="case")
    jobs = [(str(out), int(seed), i, config) for i in todo] + \
        [(str(out), int(seed), i, study_config) for i in todo_studies]

    def collect(status: dict[str, Any]) -> None:
        nonlocal volumes
        volumes += status["volumes"]
        if "error" in status:
            failed.append(status["error"])
        bar.update(1)

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            collect(_job(job))
    else:
        import importlib
        import multiprocessing as mp

        # import the heavy modules (torch/monai via io and transforms) once here, so forked workers share them
        for module in ("radfm3d.io", "radfm3d.transforms"):
            importlib.import_module(module)

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for status in pool.map(_job, jobs, chunksize=max(1, min(8, len(jobs) // (4 * workers)))):
                collect(status)
    bar.close()
    seconds = time.perf_counter() - t0

    failed_cases = {f["case"] for f in failed}
    written = [i for i in range(n) if f"case-{i:06d}" not in failed_cases]
    written_studies = [study_paths(i, STUDY_SERIES)["sidecar"] for i in range(studies)
                       if f"study-{i:06d}" not in failed_cases]
    manifests, split_counts, records_per_split = write_manifests(out, written, written_studies)
    if grid is not None:
        from radfm3d.transforms import PreprocessingRecipe

        PreprocessingRecipe(spatial_size=tuple(grid)).save(out)
    summary = {
        "n": n, "seed": int(seed), "out_dir": str(out), "config": config,
        "generated": len(todo) + len(todo_studies) - len(failed),
        "skipped": n + studies - len(todo) - len(todo_studies), "removed_temporaries": cleaned, "volumes": volumes,
        "seconds": round(seconds, 3), "workers": workers,
        "volumes_per_minute": round(60.0 * volumes / seconds, 1) if volumes and seconds > 0 else None,
        "cases_per_split": split_counts, "records_per_split": records_per_split,
        "manifests": manifests,
    }
    if studies:
        summary["studies"] = studies
    if failed:
        summary["failed"] = failed
    write_json_atomic(summary, out / "dataset.json")
    if failed:
        raise PhantomGenerationError(f"{len(failed)} of {n + studies} cases failed (recorded in "
                                     f"{out / 'dataset.json'})",
                                     summary)
    return summary


def _grid_arg(text: str) -> tuple[int, int, int] | None:
    if text.lower() in ("none", "off", ""):
        return None
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--grid needs three positive ints like 128,128,32, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _pair_arg(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError(f"expected min,max with 1 <= min <= max, got {text!r}")
    return parts[0], parts[1]


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d phantoms --n N --out DIR --seed S --workers W --dicom-fraction 0.1 [--grid 128,128,32]``.

    Exit status: 0 when every case was written, 1 when some failed (listed on stderr), 2 for bad arguments."""
    parser = argparse.ArgumentParser(prog="radfm3d phantoms", description="Generate the RadPhantom benchmark: "
                                     "synthetic CT/MRI volumes with known findings + task manifests (resumable).")
    parser.add_argument("--n", type=int, required=True, help="number of cases")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (fixes volumes, texts and splits)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="parallel processes")
    parser.add_argument("--dicom-fraction", type=float, default=0.1, help="fraction also written as DICOM series")
    parser.add_argument("--prior-fraction", type=float, default=0.25, help="fraction with a prior scan")
    parser.add_argument("--grid", type=_grid_arg, default=(128, 128, 32),
                        help="model grid for the 0-99 boxes (default 128,128,32; 'none' to skip boxes)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of tasks (default all)")
    parser.add_argument("--matrix", type=_pair_arg, default=(96, 192), help="min,max in-plane matrix (default 96,192)")
    parser.add_argument("--slices", type=_pair_arg, default=(24, 64), help="min,max number of slices (default 24,64)")
    parser.add_argument("--studies", type=int, default=0,
                        help="multi-series studies (CT + MR T1 + MR T2 of one anatomy, a study_report task each) "
                             "written besides the cases (default 0; the cases are the same with or without them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not 0.0 <= args.dicom_fraction <= 1.0 or not 0.0 <= args.prior_fraction <= 1.0:
        parser.error("--dicom-fraction and --prior-fraction must be in [0, 1]")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    status = 0
    try:
        summary = generate_phantoms(args.out, args.n, args.seed, workers=args.workers,
                                    dicom_fraction=args.dicom_fraction, prior_fraction=args.prior_fraction,
                                    grid=args.grid, tasks=tasks, matrix=args.matrix, slices=args.slices,
                                    progress=not args.no_progress, studies=args.studies)
    except ValueError as exc:
        print(f"radfm3d phantoms: {exc}", file=sys.stderr)
        return 2
    except PhantomGenerationError as exc:
        summary, status = exc.summary, 1
    keys = ("n", "generated", "skipped", "volumes", "seconds", "volumes_per_minute", "cases_per_split",
            "records_per_split")
    print(json.dumps({k: summary[k] for k in keys}))
    if status:
        failed = summary["failed"]
        print(f"radfm3d phantoms: {len(failed)} of {summary['n']} cases failed (the others were written; rerun the "
              f"same command to retry them):", file=sys.stderr)
        for f in failed:
            print(f"  {f['case']} ({f['file']}): {f['error']}", file=sys.stderr)
    return status
