# Copyright (c) radfm3d contributors. Apache-2.0.
"""GroupedBatchSampler / build_sampler: one-group batches, every record once per epoch, per-rank slices, resume."""

from __future__ import annotations

from collections import Counter

import pytest
from monai.data import Dataset
from torch.utils.data import DataLoader

from radfm3d.engine.data import GroupedBatchSampler, ResumableSampler, build_sampler


def records(sizes=(23, 17, 9), missing=0):
    out = [{"id": f"{name}-{i}", "region": name} for name, n in zip(("head", "chest", "abdomen"), sizes)
           for i in range(n)]
    return out + [{"id": f"none-{i}"} for i in range(missing)]


def global_batches_of(sampler_args, dataset, replicas):
    """What every rank yields, regrouped into global batches."""
    per_rank = []
    for rank in range(replicas):
        sampler = GroupedBatchSampler(dataset, num_replicas=replicas, rank=rank, **sampler_args)
        sampler.set_epoch(3)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    b = sampler_args["batch_size"]
    n = len(per_rank[0])
    return [sum((r[i:i + b] for r in per_rank), []) for i in range(0, n, b)]


@pytest.mark.parametrize("batch_size,replicas,fraction", [(4, 1, 1.0), (4, 2, 1.0), (3, 2, 0.5), (5, 1, 0.0),
                                                          (4, 3, 0.5)])
def test_every_record_once_and_the_asked_share_of_one_group_batches(batch_size, replicas, fraction):
    dataset = Dataset(records(missing=2))
    batches = global_batches_of({"batch_size": batch_size, "group_key": "region", "fraction": fraction}, dataset,
                                replicas)
    flat = [i for batch in batches for i in batch]
    counts = Counter(flat)
    assert set(counts) == set(range(len(dataset)))
    padding = len(flat) - len(dataset)
    assert 0 <= padding < replicas and sum(c - 1 for c in counts.values()) == padding
    global_batch = batch_size * replicas
    full = [batch for batch in batches if len(batch) == global_batch]
    assert len(full) == len(dataset) // global_batch
    one_group = sum(len({dataset.data[i].get("region") for i in batch}) == 1 for batch in full)
    fillable = sum(n // global_batch for n in (23, 17, 9, 2))
    assert one_group >= min(fillable, round(fraction * len(full)))
    if fraction == 1.0:
        assert one_group >= fillable


def test_with_fraction_one_each_loader_batch_is_one_region():
    dataset = Dataset(records(sizes=(16, 8, 12)))
    sampler = build_sampler(dataset, batch_size=4, seed=1, group_key="region", group_fraction=1.0)
    assert isinstance(sampler, GroupedBatchSampler)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=list)
    regions = [{r["region"] for r in batch} for batch in loader]
    assert len(regions) == 9 and all(len(r) == 1 for r in regions)


def test_the_order_is_fixed_by_seed_and_epoch_and_resumes_mid_epoch():
    dataset = Dataset(records())
    make = lambda seed: GroupedBatchSampler(dataset, batch_size=4, group_key="region", fraction=0.5, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    a.set_epoch(2)
    b.set_epoch(2)
    order = list(a)
    assert order == list(b)
    b.set_epoch(3)
    assert list(b) != order
    assert list(make(1)) != list(make(0))
    a.skip_next(12)
    assert list(a) == order[12:]
    assert list(a) == order, "the skip applies to the next iteration only"
    assert a.state_dict()["group_key"] == "region"


def test_without_shuffle_the_batches_keep_the_record_order_within_groups():
    dataset = Dataset(records(sizes=(8, 4, 0)))
    sampler = GroupedBatchSampler(dataset, batch_size=4, group_key="region", shuffle=False)
    assert list(sampler) == list(range(12))


def test_drop_last_leaves_out_the_partial_batch():
    dataset = Dataset(records(sizes=(5, 5, 0)))
    sampler = GroupedBatchSampler(dataset, batch_size=4, group_key="region", drop_last=True)
    assert len(sampler) == 8 == len(list(sampler))


def test_build_sampler_without_a_key_is_the_plain_resumable_sampler():
    sampler = build_sampler(Dataset(records()), batch_size=4, group_key=None)
    assert type(sampler) is ResumableSampler


@pytest.mark.parametrize("kwargs,message", [({"fraction": 1.5}, "fraction"), ({"batch_size": 0}, "batch_size")])
def test_bad_arguments_are_named(kwargs, message):
    args = {"batch_size": 4, "group_key": "region", **kwargs}
    with pytest.raises(ValueError, match=message):
        GroupedBatchSampler(Dataset(records()), **args)


def test_a_dataset_without_records_is_refused():
    with pytest.raises(ValueError, match="records"):
        GroupedBatchSampler(list(range(10)), batch_size=2, group_key="region")
