# Copyright (c) radfm3d contributors. Apache-2.0.
"""Image–report pairs for contrastive pre-training: manifest records -> the training batch of the CLIP model.

A record is one item: its ``images`` are the series of one study (one for a single scan), its ``answer`` is the
report, and its optional ``report_structures`` (:mod:`radfm3d.data.manifest`) say where each report sentence is::

    dataset = build_clip_dataset("data/phantoms/train.jsonl")              # records (images made absolute)
    collate = ClipCollate(tokenizer, recipe, image_cache_dir="cache/images")
    batch = collate([dataset[0], dataset[1]])

The batch (``B`` items, ``S`` = most series of one item, ``R`` structure rows)::

    pixel_values (B, S, C, H, W, D) float32, image_mask (B, S) bool        # absent series are zeros, mask False
    report_input_ids / report_attention_mask (B, L) long, report_group (B,) long
    structure_index (R, 2) long [item b, series s]
    structure_boxes (R, 6) float32 [i1, j1, k1, i2, j2, k2]: the box on series s's model grid as a half-open voxel
        extent (grid voxel v spans [v, v + 1) along its axis; clipped to [0, size])
    structure_input_ids / structure_attention_mask (R, L2) long, structure_group (R,) long
    ids: list[str]

A structure row is made for every series on whose grid the sentence's box is visible (at least
``min_visible_fraction`` of the box's grid volume inside the grid); its world box comes from ``box_world_mm`` or,
for a ``mask`` entry, from the mask's voxels (label ``mask_label``, or any non-zero voxel) mapped to world RAS mm
through the mask file's affine. Entries with neither are skipped. ``*_group`` are
:func:`radfm3d.contrastive.loss.group_ids` of the texts, so identical texts are never negatives of each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radfm3d.errors import RadFM3DInputError

__all__ = ["CLIP_TASKS", "build_clip_dataset", "clip_records", "ClipCollate", "grid_extent_of_world_box",
           "mask_world_box"]

#: tasks whose records pair images with a report
CLIP_TASKS = ("report", "study_report")


def clip_records(manifest: str | os.PathLike, tasks: Sequence[str] | None = CLIP_TASKS,
                 limit: int | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Records of a manifest that pair images with a report text (``answer``), paths made absolute.

    ``manifest``: a JSONL file, or a dataset folder whose ``<split>.jsonl`` is read. ``tasks``: keep records whose
    ``task`` is one of these (None: any task; a record without ``task`` counts as ``report``). A record needs
    ``id``, ``images`` and ``answer``; ``prompt`` is optional (checked when given). Image and ``report_structures``
    mask paths are resolved against the manifest's folder. Raises ``RadFM3DInputError`` (the manifest's problems, or
    no record left)."""
    from radfm3d.data.manifest import read_manifest

    path = Path(manifest)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    base = path.resolve().parent
    out: list[dict[str, Any]] = []
    for rec in read_manifest(path, require_prompt=False):  # an image-report pair needs no prompt
        if tasks is not None and rec.get("task", "report") not in tasks:  # no task: an image-report pair
            continue
        if not rec.get("images") or not str(rec.get("answer") or "").strip():
            continue
        rec = dict(rec)
        rec["images"] = [str(base / p) for p in rec["images"]]
        if rec.get("report_structures"):
            rec["report_structures"] = [
                {**s, "mask": str(base / s["mask"])} if s.get("mask") else dict(s) for s in rec["report_structures"]]
        out.append(rec)
        if limit is not None and len(out) >= int(limit):
            break
    if not out:
        raise RadFM3DInputError(path, f"no record with images and a report (answer) left (tasks={tasks}, "
                                      f"limit={limit})")
    return out


def build_clip_dataset(manifest: str | os.PathLike, recipe: Any = None, cache_dir: str | os.PathLike | None = None,
                       tasks: Sequence[str] | None = CLIP_TASKS, limit: int | None = None, *, split: str = "train",
                       warm: bool = False, num_workers: int = 0) -> Any:
    """A MONAI ``Dataset`` of :func:`clip_records` (the images are read by :class:`ClipCollate`).

    With ``cache_dir`` and ``warm=True`` every scan is preprocessed into the
    :class:`~radfm3d.data.cache.PreprocessedImageCache` for ``recipe`` first (``num_workers`` processes), so the
    first epoch does not pay for it; records with ``image_series`` / ``image_meta`` are read at collate time."""
    from monai.data import Dataset

    records = clip_records(manifest, tasks=tasks, limit=limit, split=split)
    if cache_dir and warm:
        from radfm3d.data.cache import PreprocessedImageCache
        from radfm3d.data.image_meta import needs_record_loader

        cache = PreprocessedImageCache(cache_dir, recipe)
        cache.warm([p for r in records if not needs_record_loader(r) for p in r["images"]], num_workers=num_workers,
                   progress=False)
    return Dataset(records)


# ------------------------------------------------------------------------------------------------ geometry
def grid_extent_of_world_box(box_world_mm: Sequence[float], geometry: Any,
                             min_visible_fraction: float = 0.25) -> np.ndarray | None:
    """World RAS mm box -> half-open voxel extent ``[i1, j1, k1, i2, j2, k2]`` on a model grid, or None.

    ``geometry``: a :class:`radfm3d.transforms.GridGeometry` or its dict (``meta["grid_geometry"]``). The box's 8
    corners are mapped to continuous grid indices (voxel centres at integers), shifted by 0.5 so that voxel ``v``
    spans ``[v, v + 1)``, and clipped to ``[0, size]``. None when less than ``min_visible_fraction`` of the box's
    grid volume lies inside the grid (or nothing does)."""
    from radfm3d.transforms import GridGeometry

    geom = geometry if isinstance(geometry, GridGeometry) else GridGeometry.from_dict(geometry)
    box = np.asarray(geom.box_world_to_grid(box_world_mm), dtype=np.float64) + 0.5
    size = np.asarray(geom.spatial_size, dtype=np.float64)
    clipped = np.concatenate([np.clip(box[:3], 0.0, size), np.clip(box[3:], 0.0, size)])
    extent = clipped[3:] - clipped[:3]
    if np.any(extent <= 0):
        return None
    full = float(np.prod(np.maximum(box[3:] - box[:3], 1e-9)))
    if float(np.prod(extent)) < min_visible_fraction * full:
        return None
    return clipped


def mask_world_box(mask: str | os.PathLike, label: int | None = None) -> np.ndarray | None:
    """World RAS mm box ``[x1, y1, z1, x2, y2, z2]`` of a segmentation's voxels (value ``label``, or any non-zero
    value when None): the voxel extents ``[min - 0.5, max + 0.5]`` mapped through the file's affine. None when no
    voxel has the label."""
    from radfm3d.io import load_image

    image = load_image(Path(mask))
    data = image.as_tensor().numpy()
    hit = np.any(data == label, axis=0) if label is not None else np.any(data != 0, axis=0)
    idx = np.argwhere(hit)
    if idx.size == 0:
        return None
    vox = np.concatenate([idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5])
    affine = np.asarray(image.affine, dtype=np.float64)
    corners = np.array([[vox[a + 3 * c[a]] for a in range(3)] for c in np.ndindex(2, 2, 2)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return np.concatenate([world.min(axis=0), world.max(axis=0)])


# ------------------------------------------------------------------------------------------------ collate
class ClipCollate:
    """Records -> the contrastive training batch (module docstring): reads and preprocesses each series, tokenizes
    the report and the structure sentences, maps structure boxes onto each series' model grid.

    Args:
        tokenizer: the text tower's tokenizer (a ``transformers`` tokenizer: ``tokenizer(texts, padding=...,
            truncation=..., max_length=..., return_tensors="pt")``).
        recipe: :class:`radfm3d.transforms.PreprocessingRecipe` (or its dict; None = default).
        image_cache_dir: read preprocessed series from a :class:`~radfm3d.data.cache.PreprocessedImageCache` there
            (made on first use); None = preprocess every time.
        max_text_length: tokens per text (longer ones are truncated).
        min_visible_fraction: see :func:`grid_extent_of_world_box`.
    """

    def __init__(self, tokenizer: Any, recipe: Any = None, image_cache_dir: str | os.PathLike | None = None,
                 max_text_length: int = 128, min_visible_fraction: float = 0.25) -> None:
        from radfm3d.transforms import PreprocessingRecipe

        if recipe is None:
            recipe = PreprocessingRecipe()
        elif isinstance(recipe, Mapping):
            recipe = PreprocessingRecipe.from_dict(dict(recipe))
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.max_text_length = int(max_text_length)
        self.min_visible_fraction = float(min_visible_fraction)
        self.cache = None
        if image_cache_dir:
            from radfm3d.data.cache import PreprocessedImageCache

            self.cache = PreprocessedImageCache(image_cache_dir, recipe)
        self._mask_boxes: dict[tuple[str, int | None], np.ndarray | None] = {}

    # ---------------------------------------------------------------- pieces
    def load_series(self, record: Mapping[str, Any]) -> list[Any]:
        """The record's series preprocessed: MetaTensors ``(C, H, W, D)`` with ``meta["grid_geometry"]`` (dict).

        Series choice and corrections (``image_series`` / ``image_meta``) are applied; such images are preprocessed
        here and not cached (the cache keys on files alone)."""
        from radfm3d.data.image_meta import needs_record_loader, record_images
        from radfm3d.transforms import preprocess

        paths = list(record.get("images") or [])
        if needs_record_loader(record):
            return [preprocess(image, self.recipe) for image in record_images(record, paths)]
        if self.cache is not None:
            return [self.cache(p) for p in paths]
        return [preprocess(str(p), self.recipe) for p in paths]

    def structure_world_box(self, entry: Mapping[str, Any]) -> np.ndarray | None:
        """World box of a ``report_structures`` entry: ``box_world_mm``, else its mask's box, else None."""
        if entry.get("box_world_mm") is not None:
            return np.asarray(entry["box_world_mm"], dtype=np.float64)
        if entry.get("mask"):
            key = (str(entry["mask"]), entry.get("mask_label"))
            if key not in self._mask_boxes:
                self._mask_boxes[key] = mask_world_box(entry["mask"], entry.get("mask_label"))
            return self._mask_boxes[key]
        return None

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not texts:
            return torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1), dtype=torch.long)
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    # ---------------------------------------------------------------- batch
    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        from radfm3d.contrastive.loss import group_ids

        if not records:
            raise ValueError("ClipCollate needs at least one record")
        series = [self.load_series(r) for r in records]
        for r, s in zip(records, series):
            if not s:
                raise RadFM3DInputError(str(r.get("id", "?")), "record has no images: a contrastive item needs one")
        n_series = max(len(s) for s in series)
        first = series[0][0]
        shape = [int(v) for v in first.shape]
        for s in series:
            for image in s:
                shape = [max(a, int(b)) for a, b in zip(shape, image.shape)]
        pixel_values = torch.zeros((len(records), n_series, *shape), dtype=torch.float32)
        image_mask = torch.zeros((len(records), n_series), dtype=torch.bool)
        s_index: list[tuple[int, int]] = []
        s_boxes: list[np.ndarray] = []
        s_texts: list[str] = []
        for b, (record, images) in enumerate(zip(records, series)):
            geoms = []
            for s, image in enumerate(images):
                # series of different depth (a recipe with depth_multiple) are zero-padded at the far end: grid
                # indices of the series are unchanged
                c, h, w, d = (int(v) for v in image.shape)
                pixel_values[b, s, :c, :h, :w, :d] = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor")
                                                                     else image, dtype=torch.float32)
                image_mask[b, s] = True
                geoms.append(image.meta["grid_geometry"])
            for entry in record.get("report_structures") or []:
                box = self.structure_world_box(entry)
                if box is None:
                    continue
                for s, geom in enumerate(geoms):
                    extent = grid_extent_of_world_box(box, geom, self.min_visible_fraction)
                    if extent is not None:
                        s_index.append((b, s))
                        s_boxes.append(extent)
                        s_texts.append(str(entry["text"]))
        reports = [str(r.get("answer", "")) for r in records]
        report_ids, report_mask = self._tokens(reports)
        structure_ids, structure_mask = self._tokens(s_texts)
        return {
            "pixel_values": pixel_values, "image_mask": image_mask,
            "report_input_ids": report_ids, "report_attention_mask": report_mask,
            "report_group": group_ids(reports),
            "structure_index": torch.tensor(s_index, dtype=torch.long).reshape(-1, 2),
            "structure_boxes": torch.tensor(np.asarray(s_boxes, dtype=np.float32).reshape(-1, 6)),
            "structure_input_ids": structure_ids, "structure_attention_mask": structure_mask,
            "structure_group": group_ids(s_texts) if s_texts else torch.zeros((0,), dtype=torch.long),
            "ids": [str(r.get("id", "")) for r in records],
        }
