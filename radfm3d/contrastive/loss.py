# Copyright (c) radfm3d contributors. Apache-2.0.
"""Contrastive image-text losses: multi-positive symmetric InfoNCE with text groups, a feature queue, and the
multi-level loss over the levels of :meth:`RadFM3DCLIPModel.encode_batch`.

Positives are defined by *text groups* (:func:`group_ids`): image i and text j are a positive pair iff their groups
are equal, so identical texts (the many "no abnormality" reports) are never negatives of each other, and the series
of one study (which share their report's group) are positives of each other's text.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["group_ids", "normalise_text", "contrastive_loss", "FeatureQueue", "QueuedFeatures",
           "MultiLevelContrastiveLoss", "gather_features"]

_SPACES = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """What :func:`group_ids` hashes: lower case, runs of whitespace collapsed to one space, ends stripped."""
    return _SPACES.sub(" ", str(text)).strip().lower()


def group_ids(texts: Sequence[str]) -> torch.Tensor:
    """``(N,)`` int64 ids, equal iff the normalised texts are equal (8-byte BLAKE2b, signed).

    The id depends only on the text (no per-batch numbering), so it is valid across batches, a feature queue and
    ranks. Why a cryptographic hash: Python's ``hash`` is salted per process, and 64 bits make a collision between
    different texts practically impossible (about 1e-10 for a million distinct texts).
    """
    if isinstance(texts, str):
        raise TypeError("group_ids takes a sequence of texts, not one string")
    values = [int.from_bytes(hashlib.blake2b(normalise_text(t).encode("utf-8"), digest_size=8).digest(), "little",
                             signed=True) for t in texts]
    return torch.tensor(values, dtype=torch.long)


class QueuedFeatures(NamedTuple):
    """Past embeddings used as extra negatives: images ``(Qi, P)`` + groups ``(Qi,)``, texts ``(Qt, P)`` + groups."""

    image_embeds: torch.Tensor
    image_group: torch.Tensor
    text_embeds: torch.Tensor
    text_group: torch.Tensor


def _directional_loss(logits: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows of ``logits (R, C)``: ``-log(sum_pos exp / sum_valid exp)``, averaged over rows with a positive.

    The positives share the numerator (one multi-positive softmax), so two identical positives never compete.
    """
    has_positive = positive.any(dim=1)
    if not bool(has_positive.any()):
        return logits.sum() * 0.0
    neg_inf = torch.finfo(logits.dtype).min
    numerator = torch.logsumexp(logits.masked_fill(~positive, neg_inf), dim=1)
    denominator = torch.logsumexp(logits.masked_fill(~valid, neg_inf), dim=1)
    return (denominator - numerator)[has_positive].mean()


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                     image_group: torch.Tensor, text_group: torch.Tensor,
                     queue: QueuedFeatures | None = None) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE; a scalar.

    ``image_embeds (N, P)`` and ``text_embeds (M, P)`` are L2-normalised; ``logit_scale`` is the multiplier of the
    cosine similarities (``exp`` of the model's ``logit_scale`` parameter, 1/temperature). Image i and text j are a
    positive pair iff ``image_group[i] == text_group[j]``.

    - image -> text, for each image with at least one positive text: ``-log(sum_{j pos} e^{s l_ij} /
      sum_j e^{s l_ij})`` over the batch texts and the queued texts;
    - text -> image likewise over the batch images and the queued images; the loss is the mean of the two
      directions (each a mean over its rows that have a positive).

    ``queue``: past embeddings as extra negatives; a queued entry whose group equals the anchor's is left out of
    that anchor's softmax (neither positive nor negative: an identical text is never a negative, and a stale copy
    is not a target either).
    """
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"expected image (N, P) and text (M, P) embeddings, got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    if image_group.shape != image_embeds.shape[:1] or text_group.shape != text_embeds.shape[:1]:
        raise ValueError(f"groups {tuple(image_group.shape)} / {tuple(text_group.shape)} do not match the "
                         f"embeddings {image_embeds.shape[0]} / {text_embeds.shape[0]}")
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    image_group = image_group.to(image_embeds.device)
    text_group = text_group.to(image_embeds.device)
    texts, text_groups = text_embeds, text_group
    images, image_groups = image_embeds, image_group
    n_text, n_image = text_embeds.shape[0], image_embeds.shape[0]
    if queue is not None:
        texts = torch.cat([text_embeds, queue.text_embeds.detach().to(text_embeds)])
        text_groups = torch.cat([text_group, queue.text_group.to(text_group)])
        images = torch.cat([image_embeds, queue.image_embeds.detach().to(image_embeds)])
        image_groups = torch.cat([image_group, queue.image_group.to(image_group)])
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=image_embeds.device)

    # image -> text: columns = batch texts, then queued texts
    logits_i2t = scale * image_embeds @ texts.T
    same_i2t = image_group[:, None] == text_groups[None, :]
    in_batch = torch.arange(texts.shape[0], device=texts.device) < n_text
    positive_i2t = same_i2t & in_batch[None, :]
    valid_i2t = positive_i2t | ~same_i2t
    # text -> image: columns = batch images, then queued images
    logits_t2i = scale * text_embeds @ images.T
    same_t2i = text_group[:, None] == image_groups[None, :]
    in_batch = torch.arange(images.shape[0], device=images.device) < n_image
    positive_t2i = same_t2i & in_batch[None, :]
    valid_t2i = positive_t2i | ~same_t2i
    return 0.5 * (_directional_loss(logits_i2t, positive_i2t, valid_i2t)
                  + _directional_loss(logits_t2i, positive_t2i, valid_t2i))


class FeatureQueue:
    """FIFO of past (detached) embeddings and their groups, images and texts kept separately, newest first.

    ``push`` after the loss of a step (so a batch is never its own queued negative); ``get`` gives a
    :class:`QueuedFeatures` (or ``None`` while empty). Not a module: its contents are not saved with the model.
    """

    def __init__(self, size: int) -> None:
        if int(size) < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = int(size)
        self._image: tuple[torch.Tensor, torch.Tensor] | None = None
        self._text: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return 0 if self._image is None else int(self._image[0].shape[0])

    def _push(self, old: tuple[torch.Tensor, torch.Tensor] | None, embeds: torch.Tensor,
              group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, group = embeds.detach().float(), group.detach().to(device=embeds.device, dtype=torch.long)
        if old is not None:
            embeds, group = torch.cat([embeds, old[0].to(embeds.device)]), torch.cat([group, old[1].to(embeds.device)])
        return embeds[: self.size], group[: self.size]

    def push(self, image_embeds: torch.Tensor, image_group: torch.Tensor, text_embeds: torch.Tensor,
             text_group: torch.Tensor) -> None:
        """Add a step's embeddings; the oldest beyond ``size`` (per modality) drop out."""
        self._image = self._push(self._image, image_embeds, image_group)
        self._text = self._push(self._text, text_embeds, text_group)

    def get(self) -> QueuedFeatures | None:
        if self._image is None or self._text is None:
            return None
        return QueuedFeatures(self._image[0], self._image[1], self._text[0], self._text[1])

    def clear(self) -> None:
        self._image = self._text = None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_features(embeds: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' ``embeds (N_r, P)`` and ``group (N_r,)`` concatenated in rank order; ranks may hold different N_r.

    The embeddings go through ``torch.distributed.nn.functional.all_gather``, which keeps the graph: the gradient
    of each rank's (identical, global) loss flows back to the rank that computed the rows. Rows are padded to the
    largest N_r for the collective and the padding dropped afterwards. Without an initialised process group of more
    than one rank the inputs are returned unchanged.
    """
    if not _distributed():
        return embeds, group
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    count = torch.tensor([embeds.shape[0]], device=embeds.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = F.pad(embeds, (0, 0, 0, longest - embeds.shape[0]))
    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of a private module (_functional_collectives); it works as
        # documented (gloo included) and is the public autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        gathered = all_gather(padded.contiguous())
    group_padded = F.pad(group.to(embeds.device), (0, longest - group.shape[0]))
    groups = [torch.zeros_like(group_padded) for _ in range(world)]
    dist.all_gather(groups, group_padded.contiguous())
    return (torch.cat([g[:n] for g, n in zip(gathered, sizes)]),
            torch.cat([g[:n] for g, n in zip(groups, sizes)]))


LevelTerms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class MultiLevelContrastiveLoss(nn.Module):
    """Weighted sum of :func:`contrastive_loss` over the levels of ``encode_batch``.

    ``level_weights``: level -> weight (a level with weight 0, or absent from the batch, adds nothing);
    ``queue_size``: per-level :class:`FeatureQueue` length (0 = no queue); ``gather``: all-gather embeddings and
    groups across ranks before the loss (every rank then computes the same global loss).

    ``forward(levels, logit_scale=None) -> (total, {level: term})``: ``levels`` maps a level to
    ``(image_embeds, text_embeds, image_group, text_group)``; ``logit_scale`` (the multiplier) defaults to
    ``levels.logit_scale`` (set by :meth:`RadFM3DCLIPModel.encode_batch`). ``total = sum_level weight * term``.
    In training mode each level's queue receives the (gathered) embeddings after its term is computed.
    """

    def __init__(self, level_weights: Mapping[str, float] | None = None, queue_size: int = 0,
                 gather: bool = False) -> None:
        super().__init__()
        self.level_weights = {k: float(v) for k, v in dict(level_weights or {}).items()}
        self.queue_size = int(queue_size)
        self.gather = bool(gather)
        self.queues: dict[str, FeatureQueue] = {}

    def queue(self, level: str) -> FeatureQueue | None:
        """The level's queue (created on first use), or ``None`` without a queue."""
        if self.queue_size <= 0:
            return None
        if level not in self.queues:
            self.queues[level] = FeatureQueue(self.queue_size)
        return self.queues[level]

    def forward(self, levels: Mapping[str, LevelTerms],
                logit_scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if logit_scale is None:
            logit_scale = getattr(levels, "logit_scale", None)
        if logit_scale is None:
            raise ValueError("give logit_scale (the multiplier exp(model.logit_scale)) or levels from encode_batch")
        scale = torch.as_tensor(logit_scale)
        terms: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for level, value in levels.items():
            weight = self.level_weights.get(level, 1.0)
            if weight == 0:
                continue
            image_embeds, text_embeds, image_group, text_group = value
            if image_embeds.shape[0] == 0 or text_embeds.shape[0] == 0:
                continue
            if self.gather:
                image_embeds, image_group = gather_features(image_embeds, image_group)
                text_embeds, text_group = gather_features(text_embeds, text_group)
            queue = self.queue(level)
            term = contrastive_loss(image_embeds, text_embeds, scale.to(image_embeds.device), image_group,
                                    text_group, queue=queue.get() if queue is not None else None)
            if queue is not None and self.training:
                queue.push(image_embeds, image_group, text_embeds, text_group)
            terms[level] = term
            total = weight * term if total is None else total + weight * term
        if total is None:
            total = scale.float().sum() * 0.0 if scale.requires_grad else torch.zeros(())
        return total, terms

    def extra_repr(self) -> str:
        return f"level_weights={self.level_weights}, queue_size={self.queue_size}, gather={self.gather}"
