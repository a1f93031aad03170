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

from radfm3d.utils import is_unset

__all__ = [
    "read_records",
    "TrainingExample",
    "TrainingCollate",
    "PromptCollate",
    "ResumableSampler",
    "GroupedBatchSampler",
    "build_sampler",
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

    def _epoch_indices(self) -> list[int]:
        """This rank's indices of the current epoch, before any skip."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        indices = self._epoch_indices()
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])

    def state_dict(self) -> dict[str, int]:
        return {"seed": int(self.seed), "epoch": int(self.epoch), "num_replicas": int(self.num_replicas)}



class GroupedBatchSampler(ResumableSampler):
    """A :class:`ResumableSampler` whose batches are, for a chosen fraction of them, drawn from one group only.

    ``group_key`` names a record field (``region``, ``modality``, a site or scanner id ...; a record without it is in
    the group ``None``). With ``fraction`` 1.0 every full batch that a group can fill holds only that group's records;
    with 0.5 about half of the batches do and the rest are drawn from the records left over, mixed. Contrastive
    learning uses this for hard negatives: in a batch of one body region, "this is a head scan" tells no report from
    another, so the loss can only fall by reading the findings.

    The order of epoch ``e`` is fixed by ``(seed, e)`` and each rank takes its ``batch_size`` slice of every global
    batch (``batch_size * num_replicas`` records, one group when the batch is grouped), so resuming mid-epoch
    (:meth:`skip_next`) and distributed runs keep the batches whole. ``batch_size`` must be the loader's per-rank
    batch size. Each record appears once per epoch, except that a last partial batch is padded with records from the
    start (as ``DistributedSampler``) so that every rank gets the same number, or dropped with ``drop_last``.
    """

    def __init__(self, dataset: Any, batch_size: int, group_key: str, fraction: float = 1.0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        super().__init__(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, num_replicas=num_replicas,
                         rank=rank)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        fraction = float(fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
        self.batch_size, self.group_key, self.fraction = int(batch_size), str(group_key), fraction
        records = getattr(dataset, "data", None)
        if records is None:
            raise ValueError("GroupedBatchSampler needs a dataset with its records in .data (a MONAI Dataset)")
        labels = [record.get(self.group_key) if isinstance(record, Mapping) else None for record in records]
        self.groups: list[list[int]] = []
        seen: dict[str, int] = {}
        for index, label in enumerate(labels):
            key = repr(label)  # records hold JSON values: lists and dicts are grouped by their text
            if key not in seen:
                seen[key] = len(self.groups)
                self.groups.append([])
            self.groups[seen[key]].append(index)
        size = len(labels)
        global_batch = self.batch_size * self.num_replicas
        full, rest = divmod(size, global_batch)
        per_rank_rest = 0 if drop_last or rest == 0 else -(-rest // self.num_replicas)
        self.num_samples = full * self.batch_size + per_rank_rest
        self.total_size = self.num_samples * self.num_replicas

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches over all ranks (each ``batch_size * num_replicas`` long, the last possibly shorter
        and padded to a multiple of ``num_replicas``)."""
        generator = torch.Generator()
        generator.manual_seed(int(self.seed) + int(self.epoch))

        def shuffled(values: list) -> list:
            if not self.shuffle:
                return list(values)
            return [values[i] for i in torch.randperm(len(values), generator=generator).tolist()]

        global_batch = self.batch_size * self.num_replicas
        size = sum(len(group) for group in self.groups)
        n_full = size // global_batch
        chunks = []  # every full one-group batch the groups can fill
        for group in self.groups:
            order = shuffled(group)
            chunks += [order[i:i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
        grouped = shuffled(chunks)[:min(len(chunks), int(round(self.fraction * n_full)))]
        used = {i for batch in grouped for i in batch}
        mixed = shuffled([i for i in range(size) if i not in used])
        batches = grouped + [mixed[i:i + global_batch] for i in range(0, len(mixed), global_batch)]
        last = batches.pop() if batches and len(batches[-1]) < global_batch else None
        batches = shuffled(batches)
        if last is not None and not self.drop_last:
            padded = -(-len(last) // self.num_replicas) * self.num_replicas
            filler = [i for batch in batches for i in batch] + last
            batches.append(last + filler[:padded - len(last)])
        return batches

    def _epoch_indices(self) -> list[int]:
        indices: list[int] = []
        for batch in self.global_batches():
            share = len(batch) // self.num_replicas
            indices += batch[self.rank * share:(self.rank + 1) * share]
        return indices

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "group_key": self.group_key, "fraction": self.fraction,
                "batch_size": self.batch_size}


def build_sampler(dataset: Any, batch_size: int = 1, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                  group_key: str | None = None, group_fraction: float = 1.0) -> ResumableSampler:
    """The training sampler: :class:`ResumableSampler`, or with ``group_key`` a :class:`GroupedBatchSampler` whose
    ``group_fraction`` of batches each hold one value of that record field (``batch_size`` per rank)."""
    if is_unset(group_key):
        return ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return GroupedBatchSampler(dataset, batch_size=batch_size, group_key=str(group_key), fraction=group_fraction,
                               shuffle=shuffle, seed=seed, drop_last=drop_last)


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
