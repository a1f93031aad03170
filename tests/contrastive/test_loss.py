# Copyright (c) radfm3d contributors. Apache-2.0.
"""Contrastive losses on hand-made embeddings against a hand computation (loops over rows, math.exp)."""

from __future__ import annotations

import hashlib
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from radfm3d.contrastive.loss import (FeatureQueue, MultiLevelContrastiveLoss, QueuedFeatures, contrastive_loss,
                                      gather_features, group_ids)


def _hand_loss(images, texts, scale, image_group, text_group, queue_images=(), queue_image_group=(),
               queue_texts=(), queue_text_group=()):
    """The documented loss written out row by row: -log(sum over positives / sum over non-excluded columns)."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def direction(anchors, anchor_group, columns, column_group, queued, queued_group):
        rows = []
        for a, g in zip(anchors, anchor_group):
            pos = [math.exp(scale * dot(a, c)) for c, h in zip(columns, column_group) if h == g]
            if not pos:
                continue
            neg = [math.exp(scale * dot(a, c)) for c, h in zip(columns, column_group) if h != g]
            neg += [math.exp(scale * dot(a, c)) for c, h in zip(queued, queued_group) if h != g]
            rows.append(-math.log(sum(pos) / (sum(pos) + sum(neg))))
        return sum(rows) / len(rows)

    i2t = direction(images, image_group, texts, text_group, queue_texts, queue_text_group)
    t2i = direction(texts, text_group, images, image_group, queue_images, queue_image_group)
    return 0.5 * (i2t + t2i)


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1).float()


IMAGES = _unit([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.5, 0.5, 0.5], [0.0, 0.2, 1.0]])
TEXTS = _unit([[0.9, 0.1, 0.1], [0.0, 1.0, 0.0], [0.2, 0.1, 1.0]])


# --------------------------------------------------------------------------------------------- group ids
def test_group_ids_equal_iff_normalised_texts_equal():
    ids = group_ids(["No abnormality.", "  no   ABNORMALITY. ", "No abnormality", "Nodule\tin the\nright lung.",
                     "nodule in the right lung."])
    assert ids.dtype == torch.int64 and ids.shape == (5,)
    assert ids[0] == ids[1] and ids[3] == ids[4]
    assert ids[0] != ids[2] and ids[0] != ids[3]
    # a function of the text only (BLAKE2b-64 of the normalised text), not of the batch or the process
    expected = int.from_bytes(hashlib.blake2b(b"no abnormality.", digest_size=8).digest(), "little", signed=True)
    assert int(ids[0]) == expected
    assert torch.equal(group_ids(["nodule in the right lung."]), ids[4:])
    with pytest.raises(TypeError):
        group_ids("one string")


# --------------------------------------------------------------------------------------------- contrastive_loss
@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_loss_matches_hand_computation_with_multi_positives(scale):
    image_group = torch.tensor([7, 8, 8, 9])  # images 1 and 2 share a report: both positives of text 1
    text_group = torch.tensor([7, 8, 9])
    got = contrastive_loss(IMAGES, TEXTS, scale, image_group, text_group)
    want = _hand_loss(IMAGES.tolist(), TEXTS.tolist(), scale, image_group.tolist(), text_group.tolist())
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_rows_without_a_positive_are_left_out():
    image_group = torch.tensor([7, 8, 8, 9])
    text_group = torch.tensor([7, 8, 5])  # text 2 matches no image; image 3 matches no text
    got = contrastive_loss(IMAGES, TEXTS, 3.0, image_group, text_group)
    want = _hand_loss(IMAGES.tolist(), TEXTS.tolist(), 3.0, image_group.tolist(), text_group.tolist())
    assert float(got) == pytest.approx(want, rel=1e-5)
    nothing = contrastive_loss(IMAGES, TEXTS, 3.0, torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7]))
    assert float(nothing) == 0.0


def test_identical_texts_are_never_negatives():
    """Two studies with the same report ("normal") and perfectly aligned embeddings: the loss vanishes at a high
    scale. Treating the duplicate as a negative (distinct groups) leaves log 2 per row."""
    images = _unit([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = _unit([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    same = torch.tensor([1, 1, 2])
    assert float(contrastive_loss(images, texts, 100.0, same, same)) < 1e-6
    distinct = torch.tensor([1, 3, 2])
    got = float(contrastive_loss(images, texts, 100.0, distinct, distinct))
    assert got == pytest.approx((4 * math.log(2)) / 6, rel=1e-4)  # 4 of 6 rows have a competing duplicate


def test_queue_adds_negatives_and_leaves_same_group_entries_out():
    image_group, text_group = torch.tensor([7, 8, 8, 9]), torch.tensor([7, 8, 9])
    queue_images, queue_texts = _unit([[0.3, 0.3, 0.9], [1.0, 0.0, 0.0]]), _unit([[0.7, 0.7, 0.0], [0.0, 0.0, 1.0]])
    queue_image_group, queue_text_group = torch.tensor([1, 7]), torch.tensor([2, 9])  # one same-group entry each
    queue = QueuedFeatures(queue_images, queue_image_group, queue_texts, queue_text_group)
    got = contrastive_loss(IMAGES, TEXTS, 5.0, image_group, text_group, queue=queue)
    want = _hand_loss(IMAGES.tolist(), TEXTS.tolist(), 5.0, image_group.tolist(), text_group.tolist(),
                      queue_images.tolist(), queue_image_group.tolist(), queue_texts.tolist(),
                      queue_text_group.tolist())
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(got) > float(contrastive_loss(IMAGES, TEXTS, 5.0, image_group, text_group))
    # a queue whose entries all share the anchors' groups changes nothing (single-group batch)
    one = torch.tensor([7, 7, 7, 7]), torch.tensor([7, 7, 7])
    copies = QueuedFeatures(IMAGES, one[0], TEXTS, one[1])
    assert float(contrastive_loss(IMAGES, TEXTS, 5.0, *one, queue=copies)) == pytest.approx(
        float(contrastive_loss(IMAGES, TEXTS, 5.0, *one)), rel=1e-6)


def test_loss_gradient_reaches_embeddings_and_scale_but_not_the_queue():
    images, texts = IMAGES.clone().requires_grad_(), TEXTS.clone().requires_grad_()
    scale = torch.tensor(4.0, requires_grad=True)
    queued = IMAGES[:2].clone().requires_grad_()
    queue = QueuedFeatures(queued, torch.tensor([1, 2]), TEXTS[:1], torch.tensor([3]))
    contrastive_loss(images, texts, scale, torch.tensor([7, 8, 8, 9]), torch.tensor([7, 8, 9]), queue).backward()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0 and scale.grad is not None
    assert queued.grad is None


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="groups"):
        contrastive_loss(IMAGES, TEXTS, 1.0, torch.tensor([1, 2]), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="embeddings"):
        contrastive_loss(IMAGES, TEXTS[:, :2], 1.0, torch.arange(4), torch.arange(3))


# --------------------------------------------------------------------------------------------- queue
def test_feature_queue_is_fifo_per_modality_and_detached():
    queue = FeatureQueue(4)
    assert queue.get() is None and len(queue) == 0
    first = torch.arange(6.0).reshape(3, 2).requires_grad_()
    queue.push(first, torch.tensor([0, 1, 2]), torch.ones(1, 2), torch.tensor([10]))
    queue.push(torch.full((2, 2), 9.0), torch.tensor([3, 4]), torch.zeros(2, 2), torch.tensor([11, 12]))
    got = queue.get()
    assert got.image_group.tolist() == [3, 4, 0, 1]  # newest first, the oldest (2) dropped
    assert got.text_group.tolist() == [11, 12, 10]
    assert not got.image_embeds.requires_grad and len(queue) == 4
    queue.clear()
    assert queue.get() is None
    with pytest.raises(ValueError):
        FeatureQueue(0)


# --------------------------------------------------------------------------------------------- multi-level
def _levels():
    return {
        "scan": (IMAGES, TEXTS, torch.tensor([7, 8, 8, 9]), torch.tensor([7, 8, 9])),
        "structure": (IMAGES[:2], TEXTS[:2], torch.tensor([1, 2]), torch.tensor([1, 2])),
        "study": (IMAGES[:0], TEXTS[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
    }


def test_multi_level_loss_weights_and_masks_levels():
    levels = _levels()
    loss = MultiLevelContrastiveLoss({"scan": 1.0, "structure": 0.5, "study": 1.0})
    total, terms = loss(levels, logit_scale=3.0)
    assert set(terms) == {"scan", "structure"}  # the empty study level adds nothing
    scan = contrastive_loss(*levels["scan"][:2], 3.0, *levels["scan"][2:])
    structure = contrastive_loss(*levels["structure"][:2], 3.0, *levels["structure"][2:])
    assert float(total) == pytest.approx(float(scan + 0.5 * structure), rel=1e-6)
    total, terms = MultiLevelContrastiveLoss({"scan": 0.0, "structure": 1.0})(levels, logit_scale=3.0)
    assert set(terms) == {"structure"} and float(total) == pytest.approx(float(structure), rel=1e-6)
    total, terms = MultiLevelContrastiveLoss({"scan": 0.0, "structure": 0.0})(levels, logit_scale=3.0)
    assert terms == {} and float(total) == 0.0
    with pytest.raises(ValueError, match="logit_scale"):
        loss(levels)


def test_multi_level_loss_fills_its_queues_in_training_only():
    levels = _levels()
    loss = MultiLevelContrastiveLoss({"scan": 1.0, "structure": 1.0}, queue_size=3)
    loss.eval()
    loss(levels, logit_scale=3.0)
    assert loss.queues == {} or all(len(q) == 0 for q in loss.queues.values())
    loss.train()
    first, _ = loss(levels, logit_scale=3.0)
    assert len(loss.queues["scan"]) == 3 and len(loss.queues["structure"]) == 2
    queued = loss.queues["scan"].get()  # the first step's embeddings: images 3 newest, texts 3
    _, terms = loss(levels, logit_scale=3.0)
    scan = levels["scan"]
    want = _hand_loss(scan[0].tolist(), scan[1].tolist(), 3.0, scan[2].tolist(), scan[3].tolist(),
                      queued.image_embeds.tolist(), queued.image_group.tolist(), queued.text_embeds.tolist(),
                      queued.text_group.tolist())
    assert float(terms["scan"]) == pytest.approx(want, rel=1e-5)
    assert float(terms["scan"]) > float(contrastive_loss(*scan[:2], 3.0, *scan[2:]))


def test_gather_features_is_identity_without_a_process_group():
    embeds, group = torch.randn(3, 4), torch.tensor([1, 2, 3])
    out_embeds, out_group = gather_features(embeds, group)
    assert out_embeds is embeds and out_group is group


# --------------------------------------------------------------------------------------------- two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child never enters the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    images, texts = torch.randn(5, 4), torch.randn(3, 4)
    image_group, text_group = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 2])
    rows = [slice(0, 2), slice(2, 5)][rank]  # ranks hold different numbers of images
    trows = [slice(0, 1), slice(1, 3)][rank]
    local_images = images[rows].clone().requires_grad_()
    local_texts = texts[trows].clone().requires_grad_()
    levels = {"scan": (F.normalize(local_images, dim=-1), F.normalize(local_texts, dim=-1), image_group[rows],
                       text_group[trows])}
    total, _ = MultiLevelContrastiveLoss({"scan": 1.0}, gather=True)(levels, logit_scale=5.0)
    total.backward()
    torch.save({"loss": total.detach(), "image_grad": local_images.grad, "text_grad": local_texts.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while the other is still in a collective
    dist.destroy_process_group()


def test_two_ranks_gather_gives_the_global_loss_and_gradients(tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers need nothing but torch, already imported (spawn would re-import it, seconds per process)
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    torch.manual_seed(0)
    images, texts = torch.randn(5, 4).requires_grad_(), torch.randn(3, 4).requires_grad_()
    ref = contrastive_loss(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), 5.0,
                           torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 2]))
    ref.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in results:
        assert float(result["loss"]) == pytest.approx(float(ref.detach()), rel=1e-5)
    # each rank's loss is the global loss; summed over ranks (as DDP's mean of W identical losses' gradients
    # works out), the gradient on a rank's own rows is W x the global gradient of those rows
    image_grad = torch.cat([results[0]["image_grad"], results[1]["image_grad"]])
    text_grad = torch.cat([results[0]["text_grad"], results[1]["text_grad"]])
    assert torch.allclose(image_grad, 2 * images.grad, atol=1e-5)
    assert torch.allclose(text_grad, 2 * texts.grad, atol=1e-5)
