# Copyright (c) radfm3d contributors. Apache-2.0.
"""A per-image cache of preprocessed volumes on disk, so training epochs do not re-read and re-resample scans.

Why our own instead of MONAI's ``PersistentDataset``: that caches whole *records* keyed by the record's hash, and a
phantom case has a dozen records (report, VQA, grounding, ...) over the same scan, so it would store each volume a
dozen times. Here the key is the *image* plus the preprocessing recipe, so every record, every epoch and both training
stages share one entry per scan, and changing the recipe (or the data) can never serve a stale tensor. The image
part of the key is what identifies the data: for a file its absolute path, size and modification time (and those of
the data files a detached ``.mhd``/``.nhdr`` header names); for a DICOM folder the full list of its files, each with
its relative path, size and modification time (so replacing any slice, not only the newest, changes the key).

Entries are safetensors files (``image``: ``(C, H, W, D)`` float16 in [0, 1], rounding error <= 2.5e-4; the
``grid_geometry`` JSON in the metadata), written to a temporary name and renamed, so a killed warm-up never leaves a
half-written entry and a rerun continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["PreprocessedImageCache", "data_fingerprint", "images_of"]


class PreprocessedImageCache:
    """``cache(path) -> MetaTensor (C, H, W, D)`` float32 with ``meta["grid_geometry"]``, preprocessed once.

    Args:
        cache_dir: folder of the entries (created on demand).
        recipe: the :class:`radfm3d.transforms.PreprocessingRecipe` (or its dict) the entries are made with.
    """

    def __init__(self, cache_dir: str | os.PathLike, recipe: Any = None) -> None:
        from radfm3d.transforms import PreprocessingRecipe

        if recipe is None:
            recipe = PreprocessingRecipe()
        elif isinstance(recipe, dict):
            recipe = PreprocessingRecipe.from_dict(recipe)
        self.recipe = recipe
        self.cache_dir = Path(cache_dir)
        self._recipe_key = json.dumps(recipe.to_dict(), sort_keys=True)

    def entry_path(self, image: str | os.PathLike) -> Path:
        """Where the entry of ``image`` lives (the name changes with :func:`data_fingerprint` and the recipe)."""
        key = f"{data_fingerprint(image)}|{self._recipe_key}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.safetensors"

    def has(self, image: str | os.PathLike) -> bool:
        return self.entry_path(image).is_file()

    def _write(self, image: str | os.PathLike, entry: Path) -> None:
        from safetensors.torch import save_file

        from radfm3d.transforms import preprocess

        out = preprocess(str(image), self.recipe)
        tensor = out.as_tensor().detach().to(torch.float16).contiguous()
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        save_file({"image": tensor}, str(tmp), metadata={"grid_geometry": json.dumps(out.meta["grid_geometry"]),
                                                         "source": str(image)})
        os.replace(tmp, entry)

    def __call__(self, image: str | os.PathLike) -> Any:
        """The preprocessed image (from the cache, or preprocessed and stored now)."""
        from monai.data import MetaTensor
        from safetensors import safe_open

        entry = self.entry_path(image)
        if not entry.is_file():
            self._write(image, entry)
        with safe_open(str(entry), framework="pt") as f:
            tensor = f.get_tensor("image").to(torch.float32)
            geometry = json.loads(f.metadata()["grid_geometry"])
        return MetaTensor(tensor, meta={"grid_geometry": geometry, "filename_or_obj": str(image)})

    def warm(self, images: Iterable[str | os.PathLike], num_workers: int = 0, progress: bool = True) -> int:
        """Preprocess every image not cached yet (in ``num_workers`` processes; progress bar). Returns how many were
        written. Safe to interrupt and rerun."""
        from radfm3d.utils import progress_bar

        todo = sorted({str(Path(p).resolve()) for p in images if not self.has(p)})
        if not todo:
            return 0
        bar = progress_bar(len(todo), enabled=progress, desc="preprocessing cache", unit="scan")
        try:
            if num_workers and num_workers > 1:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor

                # Each worker runs torch single-threaded: a child forked from a process whose OpenMP pool is running
                # (the caller has usually built a model by now) hangs for ever in its first parallel op (seen: the
                # val-split warm-up stuck at 0%); with one thread torch never enters that pool. Not forkserver/spawn:
                # they re-import __main__, which fails for `python -` scripts.
                ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
                with ProcessPoolExecutor(int(num_workers), mp_context=ctx, initializer=torch.set_num_threads,
                                         initargs=(1,)) as pool:
                    for _ in pool.map(self._warm_one, todo, chunksize=4):
                        bar.update(1)
            else:
                for path in todo:
                    self._warm_one(path)
                    bar.update(1)
        finally:
            bar.close()
        return len(todo)

    def _warm_one(self, image: str) -> None:
        entry = self.entry_path(image)
        if not entry.is_file():
            self._write(image, entry)


def data_fingerprint(image: str | os.PathLike) -> str:
    """A hex digest that changes whenever the data ``load_image(image)`` reads may have changed.

    A file: absolute path, size, mtime (ns), plus those of the data files a detached header names. A folder (DICOM):
    every file :func:`radfm3d.io.dicom_folder_files` walks (bounded like the reader; raises ``RadFM3DInputError``
    past the bound), each as relative path, size and mtime (ns).
    """
    from radfm3d.io import detached_data_files, dicom_folder_files

    path = Path(image).resolve()
    digest = hashlib.sha1(str(path).encode())
    if path.is_dir():
        members = dicom_folder_files(path)
    else:
        members = [path] + [path.parent / name for name in detached_data_files(path)]
    for member in members:
        try:
            st = member.stat()
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        rel = os.path.relpath(member, path) if path.is_dir() else os.path.relpath(member, path.parent)
        digest.update(f"\n{rel}|{stamp}".encode())
    return digest.hexdigest()


def images_of(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every image path named by a list of manifest records (absolute paths as ``read_records`` gives them)."""
    return sorted({p for r in records for p in (r.get("images") or [])})
