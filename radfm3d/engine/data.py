# Copyright (c) radfm3d contributors. Apache-2.0.
"""Manifest (JSONL) -> MONAI ``Dataset`` -> ``DataLoader`` with a seeded, resumable (distributed) sampler.

Training items are built by the processor (``build_training_example``: prompt + answer + images -> ids, labels,
pixels); generation items are batched prompts (left padding) with the record ids and grid geometry kept for the
prediction writer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset
from torch.utils.data import DataLoader, DistributedSampler

__all__ = [
    "read_records",
    "TrainingExample",
    "TrainingCollate",
    "PromptCollate",
    "ResumableSampler",
    "build_dataset",
    "build_dataloader",
    "dist_info",
]

PASSTHROUGH_KEYS = ("id", "task", "grid_geometry")


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the running process (0, 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def read_records(
    manifest: str | os.PathLike, tasks: Sequence[str] | None = None, limit: int | None = None,
) -> list[dict[str, Any]]:
    """Records of a JSONL manifest, image paths made absolute (relative to the manifest's folder).

    tasks: keep records whose ``task`` starts with one of these; limit: keep the first N (after filtering).
    """
    from radfm3d.errors import RadFM3DInputError

    path = Path(manifest)
    if not path.is_file():
        raise RadFM3DInputError(path, "manifest file not found")
    from radfm3d.data.manifest import read_manifest

    records = list(read_manifest(path))
    base = path.resolve().parent
    out = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if "prompt" not in rec:
            raise RadFM3DInputError(path, f"record {i + 1} ({rec.get('id', '?')}) has no 'prompt'")
        rec.setdefault("id", f"{path.stem}-{i:06d}")
        rec["images"] = [str(base / p) for p in rec.get("images") or []]
        if tasks and not any(str(rec.get("task", "")).startswith(t) for t in tasks):
            continue
        out.append(rec)
    if limit is not None:
        out = out[: int(limit)]
    if not out:
        raise RadFM3DInputError(path, f"no records left (tasks={tasks}, limit={limit})")
    return out


def _image_cache(processor: Any, image_cache_dir: str | os.PathLike | None) -> Any:
    """A :class:`radfm3d.data.cache.PreprocessedImageCache` for the processor's recipe (None without a folder)."""
    if not image_cache_dir:
        return None
    from radfm3d.data.cache import PreprocessedImageCache

    return PreprocessedImageCache(image_cache_dir, processor.recipe)


def _images(record: Mapping[str, Any], cache: Any) -> tuple[list[Any], bool]:
    """(images of a record, already preprocessed?): paths, or cached preprocessed tensors when a cache is set.

    A record whose images carry a series choice or corrections (``image_series`` / ``image_meta``,
    :mod:`radfm3d.data.image_meta`) has them read with those applied; with a cache they are preprocessed here,
    not stored (the cache keys on files alone).
    """
    from radfm3d.data.image_meta import needs_record_loader, record_images

    paths = list(record.get("images") or [])
    if needs_record_loader(record):
        loaded = record_images(record, paths)
        if cache is None:
            return loaded, False
        from radfm3d.transforms import preprocess

        return [preprocess(image, cache.recipe) for image in loaded], True
    return ([cache(p) for p in paths], True) if cache is not None else (paths, False)


class TrainingExample:
    """record -> ``processor.build_training_example(prompt, answer, images)`` (+ id/task kept as metadata).

    ``image_cache_dir``: read each scan's preprocessed tensor from a :class:`~radfm3d.data.cache.PreprocessedImageCache`
    (made on first use) instead of loading and resampling it for every record and epoch.
    """

    def __init__(self, processor: Any, image_cache_dir: str | os.PathLike | None = None) -> None:
        self.processor = processor
        self.cache = _image_cache(processor, image_cache_dir)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        images, preprocessed = _images(record, self.cache)
        example = dict(self.processor.build_training_example(record["prompt"], str(record.get("answer", "")),
                                                              images, images_are_preprocessed=preprocessed))
        for key in ("id", "task"):
            if key in record:
                example[key] = record[key]
        return example


def _pad_stack(seqs: Sequence[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    length = max(int(s.shape[-1]) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if left:
            out[i, length - s.shape[-1]:] = s
        else:
            out[i, : s.shape[-1]] = s
    return out


class TrainingCollate:
    """Pad a list of training examples into a batch (right padding; labels -100, attention 0 on pads).

    Uses ``processor.collate_training`` when the processor has it; keeps ``id``/``task`` as lists.
    """

    def __init__(self, processor: Any = None, pad_token_id: int | None = None) -> None:
        self.processor = processor
        self.pad_token_id = pad_token_id

    def _pad_id(self) -> int:
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        tok = getattr(self.processor, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        meta = {k: [e.get(k) for e in examples] for k in PASSTHROUGH_KEYS if any(k in e for e in examples)}
        tensors = [{k: v for k, v in e.items() if k not in PASSTHROUGH_KEYS} for e in examples]
        if self.processor is not None and hasattr(self.processor, "collate_training"):
            batch = dict(self.processor.collate_training(tensors))
        else:
            batch = self._collate(tensors)
        batch.update(meta)
        return batch

    def _collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        def seq(key: str) -> list[torch.Tensor]:
            return [torch.as_tensor(e[key]).reshape(-1) for e in examples]

        batch: dict[str, Any] = {"input_ids": _pad_stack(seq("input_ids"), self._pad_id())}
        batch["attention_mask"] = _pad_stack(seq("attention_mask"), 0) if "attention_mask" in examples[0] else (
            _pad_stack([torch.ones_like(s) for s in seq("input_ids")], 0))
        if "labels" in examples[0]:
            batch["labels"] = _pad_stack(seq("labels"), -100)
        if "pixel_values" in examples[0]:
            pix = [torch.as_tensor(e["pixel_values"]) for e in examples]
            pix = [p if p.ndim == 5 else p.unsqueeze(0) for p in pix]  # (S, C, H, W, D)
            n_img = max(p.shape[0] for p in pix)
            stacked = torch.zeros((len(pix), n_img, *pix[0].shape[1:]), dtype=pix[0].dtype)
            mask = torch.zeros((len(pix), n_img), dtype=torch.bool)
            for i, p in enumerate(pix):
                stacked[i, : p.shape[0]] = p
                mask[i, : p.shape[0]] = True
            batch["pixel_values"], batch["image_mask"] = stacked, mask
        return batch


class PromptCollate:
    """Records -> ``processor(text=prompts, images=..., padding_side="left")`` plus ``id``/``task``/``grid_geometry``.

    The images are read and preprocessed here (in the loader workers); ``grid_geometry`` holds, per sample, the
    geometry dict of its first image (what the harness needs to map boxes back to the scan).
    """

    def __init__(self, processor: Any, image_cache_dir: str | os.PathLike | None = None) -> None:
        self.processor = processor
        self.cache = _image_cache(processor, image_cache_dir)

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        prompts = [str(r["prompt"]) for r in records]
        loaded = [_images(r, self.cache) for r in records]
        images = [imgs for imgs, _ in loaded]
        if any(images):
            feats = self.processor(text=prompts, images=images, return_tensors="pt", padding_side="left",
                                   images_are_preprocessed=self.cache is not None)
        else:
            feats = self.processor(text=prompts, return_tensors="pt", padding_side="left")
        batch = {k: feats[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask") if k in feats}
        geoms = feats.get("grid_geometry") if hasattr(feats, "get") else None
        batch["grid_geometry"] = [g[0] if g else None for g in geoms] if geoms else [None] * len(records)
        batch["id"] = [str(r["id"]) for r in records]
        batch["task"] = [str(r.get("task", "")) for r in records]
        return batch


class ResumableSampler(DistributedSampler):
    """A seeded (distributed) sampler: the order of epoch e is fixed by (seed, e), and the first batches of one epoch
    can be skipped to resume mid-epoch with the same data order.

    Without ``torch.distributed`` it is a single-replica sampler (rank 0 of 1). MONAI engines call ``set_epoch`` at
    every epoch start (``Workflow`` does it for any ``DistributedSampler``).
    """

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        d_rank, d_world = dist_info()
        super().__init__(dataset, num_replicas=d_world if num_replicas is None else num_replicas,
                         rank=d_rank if rank is None else rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Also tell the dataset the epoch when it draws per-epoch randomness (a dataset with ``set_epoch``), so a
        resumed run draws the same samples."""
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def skip_next(self, n_samples: int) -> None:
        """Skip the first ``n_samples`` indices (of this rank) in the next iteration only."""
        self._skip = max(0, int(n_samples))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])

    def state_dict(self) -> dict[str, int]:
        return {"seed": int(self.seed), "epoch": int(self.epoch), "num_replicas": int(self.num_replicas)}


def build_dataset(
    manifest: str | os.PathLike, processor: Any, mode: str = "train", tasks: Sequence[str] | None = None,
    limit: int | None = None, cache_rate: float = 0.0, num_workers: int = 0,
    image_cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """A MONAI dataset over a manifest: ``mode="train"`` builds training examples (cacheable in memory with
    ``cache_rate``; ``image_cache_dir`` keeps one preprocessed tensor per scan on disk instead, see
    :class:`TrainingExample`); ``mode="generate"`` yields the records themselves (batched by
    :class:`PromptCollate`)."""
    records = read_records(manifest, tasks=tasks, limit=limit)
    if mode == "generate":
        return Dataset(records)
    if mode != "train":
        raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
    transform = TrainingExample(processor, image_cache_dir)
    if cache_rate > 0:
        return CacheDataset(records, transform=transform, cache_rate=cache_rate, num_workers=num_workers or None,
                            progress=False)
    return Dataset(records, transform=transform)


def build_dataloader(
    dataset: Any, batch_size: int = 1, collate_fn: Any = None, shuffle: bool = True, seed: int = 0,
    num_workers: int = 0, drop_last: bool = False, sampler: Any = None,
) -> DataLoader:
    """DataLoader with a :class:`ResumableSampler` (distributed when torch.distributed is initialised) and its own
    seeded generator, so creating an iterator never draws from the global RNG (keeps resumed runs identical)."""
    if sampler is None:
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, drop_last=drop_last, generator=generator,
                      persistent_workers=False)
