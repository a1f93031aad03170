# Copyright (c) radfm3d contributors. Apache-2.0.
"""Contrastive pre-training (stage 0 from reports alone) on MONAI engines.

``bundles/radfm3d_clip/configs/train.json`` wires these into MONAI's ``SupervisedTrainer`` with the same
checkpointer (exact resume), time limit, warm-up + cosine schedule, seeded resumable sampler and progress/TensorBoard
handlers as the other stages (:mod:`radfm3d.engine`):

- :func:`build_clip_model`: a ``RadFM3DCLIPModel`` from a preset name or a saved folder, seeded;
  :func:`set_clip_trainable`: freeze switches (vision, resampler, text).
- :class:`ContrastiveTrainingModule`: the model and its
  :class:`~radfm3d.contrastive.loss.MultiLevelContrastiveLoss` as one module. DDP then sees every parameter the loss
  uses (the logit scale included) in one ``forward``, the all-gather of embeddings across ranks happens inside that
  forward, and the loss's feature queues are part of the checkpointed state (exact resume with a queue).
- :class:`PrepareBatchCLIP`, :class:`ContrastiveInferer` (bf16 autocast where supported; the loss in float32),
  :class:`OutputLoss` (the engine's ``loss_function``), :func:`loss_terms_of` (per-level terms for the loggers).
- :class:`ContrastiveValidation`: held-out loss and retrieval R@K per level (:func:`retrieval_metrics`).
- :class:`CLIPExport` / :func:`export_clip_model`: ``save_pretrained`` + processor, moved into place atomically.
- :func:`run_evaluate_clip`: the evaluate-clip harness on one or more trained models (``evaluate.json``).
- :func:`embedding_records`, :class:`EmbeddingCollate`, :class:`EmbeddingInferer`, :class:`EmbeddingWriter`: the
  inference config (a folder of scans or a manifest, and optional texts -> ``embeddings.npz``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from torch import nn

from radfm3d.contrastive.configuration import is_clip_folder
from radfm3d.engine.data import dist_info
from radfm3d.engine.training import autocast_dtype, seed_everything, unwrap_model
from radfm3d.modeling.model import checked_image_mask
from radfm3d.utils import is_unset, staged_folder

__all__ = [
    "build_clip_model",
    "set_clip_trainable",
    "load_clip_processor",
    "load_clip_model",
    "ContrastiveTrainingModule",
    "build_training_module",
    "PrepareBatchCLIP",
    "ContrastiveInferer",
    "OutputLoss",
    "loss_terms_of",
    "retrieval_metrics",
    "ContrastiveValidation",
    "export_clip_model",
    "CLIPExport",
    "run_evaluate_clip",
    "embedding_records",
    "EmbeddingCollate",
    "EmbeddingInferer",
    "EmbeddingWriter",
]

logger = logging.getLogger(__name__)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batch_device(batch: Mapping[str, Any]) -> torch.device:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ model
def build_clip_model(
    name_or_path: str | os.PathLike = "tiny", device: str | torch.device = "cpu", seed: int | None = 0,
    text_model_name_or_path: str | None = None, level_weights: Mapping[str, float] | None = None,
    queue_size: int | None = None, load_text_weights: bool = True, vision_tower: str | os.PathLike | None = None,
    **overrides: Any,
) -> nn.Module:
    """A ``RadFM3DCLIPModel`` in train mode on ``device``.

    ``name_or_path``: a saved CLIP folder (continues from its weights) or a radfm3d preset name / JSON / generative
    model folder ("tiny", "demo": vision tower and resampler shaped as that preset or model, fresh weights seeded by
    ``seed``; text tower loaded from ``text_model_name_or_path``, or random from ``text_config`` with
    ``load_text_weights=False``). ``level_weights`` and ``queue_size`` (training knobs) are written into the config
    of either, so the exported folder says how it was trained; ``overrides`` (``projection_dim``, ``study_fusion``,
    ``text_config``, ...) apply to a preset only. ``None`` values are left out.

    ``vision_tower`` (a preset only): a generative-model folder (the demo model, a converted official RadFM) or a CLIP
    folder whose vision tower and resampler replace the fresh ones
    (:func:`~radfm3d.contrastive.transfer.load_vision_tower`; the shapes must match the preset's).
    """
    from radfm3d.contrastive.model import RadFM3DCLIPModel

    if seed is not None:
        seed_everything(seed)
    weights = _level_weights(level_weights)
    folder = Path(str(name_or_path))
    if is_clip_folder(folder):
        model = RadFM3DCLIPModel.from_pretrained(str(folder))
        if weights is not None:
            model.config.level_weights = {**model.config.level_weights, **weights}
        if queue_size is not None:
            model.config.queue_size = int(queue_size)
        ignored = sorted(k for k, v in overrides.items() if v is not None)
        ignored += ["text_model_name_or_path"] if text_model_name_or_path else []
        ignored += [] if is_unset(vision_tower) else ["vision_tower"]
        if ignored:
            logger.warning(f"{folder}: a saved model keeps its architecture, weights and text tower; ignoring "
                           f"{ignored}")
    else:
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        if text_model_name_or_path is not None:
            kwargs["text_model_name_or_path"] = text_model_name_or_path
        if weights is not None:
            kwargs["level_weights"] = weights
        if queue_size is not None:
            kwargs["queue_size"] = int(queue_size)
        model = RadFM3DCLIPModel.from_preset(str(name_or_path), load_text_weights=bool(load_text_weights), **kwargs)
        if not is_unset(vision_tower):
            from radfm3d.contrastive.transfer import load_vision_tower

            load_vision_tower(model, vision_tower)
            logger.info(f"vision tower and resampler initialised from {vision_tower}")
    model.train()
    return model.to(device)


def _level_weights(weights: Mapping[str, Any] | None) -> dict[str, float] | None:
    """Level weights as floats (a bundle override may arrive as the string "0")."""
    if weights is None:
        return None
    from radfm3d.errors import RadFM3DInputError

    out = {}
    for level, value in dict(weights).items():
        try:
            out[str(level)] = float(value)
        except (TypeError, ValueError):
            raise RadFM3DInputError(f"level_weights#{level}", f"must be a number >= 0, got {value!r}") from None
        if not math.isfinite(out[str(level)]) or out[str(level)] < 0:
            raise RadFM3DInputError(f"level_weights#{level}", f"must be a number >= 0, got {value!r}")
    return out


def set_clip_trainable(model: nn.Module, vision: bool | None = None, resampler: bool | None = None,
                       text: bool | None = None, gradient_checkpointing: bool = False) -> nn.Module:
    """Train (True) or freeze (False) the vision tower, the resampler or the text tower, in place (None: as is);
    returns ``model``. The projections, the logit scale and the study fusion always train. A frozen text tower is
    the cheap choice on a CPU (no BERT gradients) and keeps the pretrained sentence encoder as it is (LiT).
    ``gradient_checkpointing``: activation checkpointing in the ViT, resampler and BERT layers (memory for time)."""
    inner = unwrap_model(model)
    inner = getattr(inner, "model", inner)  # a ContrastiveTrainingModule
    counts = inner.freeze(vision=None if vision is None else not vision,
                          resampler=None if resampler is None else not resampler,
                          text=None if text is None else not text)
    if gradient_checkpointing:
        inner.set_gradient_checkpointing(True)
    total = sum(p.numel() for p in inner.parameters())
    trained = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    logger.info(f"contrastive stage: {trained:,} of {total:,} parameters train (per tower: {counts})")
    return model


def load_clip_processor(name_or_path: str | os.PathLike, recipe: Any = None,
                        text_model_name_or_path: str | None = None) -> Any:
    """The ``RadFM3DCLIPProcessor`` (tokenizer + preprocessing recipe) of a saved CLIP folder (its own tokenizer) or
    of a preset name (the tokenizer of ``text_model_name_or_path``, default MiniLM's).

    ``recipe`` (a ``PreprocessingRecipe``, its dict, or a ``preprocessing.json`` file/folder, e.g. the one a phantom
    set is written with) replaces the folder's or preset's; a path that does not exist is ignored (None).
    """
    from radfm3d.contrastive.processing import RadFM3DCLIPProcessor
    from radfm3d.transforms import PreprocessingRecipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = PreprocessingRecipe.load(recipe) if Path(recipe).exists() else None
    elif isinstance(recipe, Mapping):
        recipe = PreprocessingRecipe.from_dict(dict(recipe))
    kwargs: dict[str, Any] = {} if recipe is None else {"recipe": recipe}
    if is_clip_folder(str(name_or_path)):
        return RadFM3DCLIPProcessor.from_pretrained(str(name_or_path), **kwargs)
    return RadFM3DCLIPProcessor.from_model_config(str(name_or_path), text_model_name_or_path=text_model_name_or_path,
                                                  **kwargs)


def load_clip_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """``RadFM3DCLIPModel.from_pretrained(model_dir)`` on ``device``, in eval mode."""
    from radfm3d.contrastive.model import RadFM3DCLIPModel

    return RadFM3DCLIPModel.from_pretrained(str(model_dir)).eval().to(device)


class ContrastiveTrainingModule(nn.Module):
    """``RadFM3DCLIPModel`` + ``MultiLevelContrastiveLoss``: ``forward(batch) -> {"loss", "terms", "n"}``.

    ``batch``: the contrastive training batch (``ClipCollate``; moved to the device by :class:`PrepareBatchCLIP`).
    ``loss``: scalar float32 total (sum of level weight x level term); ``terms``: ``{level: detached scalar}``;
    ``n``: ``{level: number of image embeddings on this rank}``. The embeddings come out of the model in the
    autocast dtype and go into the loss as float32 with autocast off (the softmax over a large batch + queue
    needs the precision). ``save_pretrained`` saves the model alone.
    """

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        levels, scale = _float_levels(self.model.encode_batch(batch))
        device = _batch_device(batch)
        with torch.autocast(device_type=device.type, enabled=False):
            total, terms = self.loss(levels, logit_scale=scale)
        return {"loss": total, "terms": {k: v.detach() for k, v in terms.items()},
                "n": {k: int(v[0].shape[0]) for k, v in levels.items()}}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Any:
        return self.model.save_pretrained(save_directory, **kwargs)

    # The loss's FeatureQueues are plain objects (not buffers: their length changes as they fill), so their contents
    # enter the state dict here, as tensors under "queue.<level>.<field>": a training checkpoint (weights_only-safe)
    # then resumes with the same queued negatives.
    _QUEUE_PREFIX = "queue."

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for level, queue in getattr(self.loss, "queues", {}).items():
            content = queue.get()
            if content is None:
                continue
            for field, tensor in zip(content._fields, content):
                destination[f"{prefix}{self._QUEUE_PREFIX}{level}.{field}"] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        head = prefix + self._QUEUE_PREFIX
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for key in [k for k in state_dict if k.startswith(head)]:
            level, _, field = key[len(head):].rpartition(".")
            saved.setdefault(level, {})[field] = state_dict.pop(key)
        for queue in getattr(self.loss, "queues", {}).values():
            queue.clear()
        for level, fields in saved.items():
            queue = self.loss.queue(level)
            if queue is None:
                unexpected_keys.extend(f"{head}{level}.{f}" for f in fields)
                continue
            try:
                queue.push(fields["image_embeds"], fields["image_group"], fields["text_embeds"], fields["text_group"])
            except KeyError as err:
                error_msgs.append(f"feature queue of level {level!r}: missing {err}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _float_levels(levels: Mapping[str, Any]) -> tuple[dict[str, tuple[torch.Tensor, ...]], torch.Tensor | None]:
    """(levels of ``encode_batch`` with float32 embeddings, their ``logit_scale`` multiplier in float32)."""
    scale = getattr(levels, "logit_scale", None)
    out = {level: tuple(t.float() if t.is_floating_point() else t for t in values) for level, values in levels.items()}
    return out, (scale.float() if isinstance(scale, torch.Tensor) else scale)


def _build_loss(model: nn.Module, queue_size: int | None = None, gather: bool = False) -> nn.Module:
    from radfm3d.contrastive.loss import MultiLevelContrastiveLoss

    config = unwrap_model(model).config
    size = int(config.queue_size if queue_size is None else queue_size)
    return MultiLevelContrastiveLoss(dict(config.level_weights), size, gather=bool(gather))


def build_training_module(model: nn.Module, gather: bool = False, queue_size: int | None = None,
                          device: str | torch.device | None = None) -> ContrastiveTrainingModule:
    """:class:`ContrastiveTrainingModule` for ``model`` with the loss of its config (level weights, queue size).

    ``gather=True`` (``multi_gpu_train.json``): embeddings are all-gathered across ranks inside the loss, so every
    rank contrasts against the global batch (gradients flow back to the local embeddings).
    """
    module = ContrastiveTrainingModule(model, _build_loss(model, queue_size, gather))
    device = device if device is not None else next(model.parameters()).device
    return module.to(device)


# ------------------------------------------------------------------------------------------------ engine glue
class PrepareBatchCLIP(PrepareBatch):
    """Move the tensors of a contrastive batch to ``device``; returns ``(batch, None, (), {})``.

    The engine then calls ``inferer(batch, network)`` and ``loss_function(pred, None)``. ``pixel_dtype``: cast
    ``pixel_values`` (default keeps float32). Lists (``ids``) are kept as they are.
    """

    def __init__(self, pixel_dtype: torch.dtype | None = None) -> None:
        self.pixel_dtype = pixel_dtype

    def __call__(self, batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[dict[str, Any], None, tuple, dict]:
        if "pixel_values" not in batchdata:
            raise KeyError(f"the batch has no 'pixel_values' (keys: {sorted(batchdata)})")
        out: dict[str, Any] = {}
        for key, value in batchdata.items():
            if isinstance(value, torch.Tensor):
                if key == "pixel_values" and self.pixel_dtype is not None:
                    value = value.to(self.pixel_dtype)
                if device is not None:
                    value = value.to(device=device, non_blocking=non_blocking, **kwargs)
            out[key] = value
        return out, None, (), {}


class ContrastiveInferer(Inferer):
    """``network(batch)`` under bf16 autocast where supported (``precision="auto"``: CUDA with bf16; "bf16" forces
    it, also on the CPU; "fp32" never). ``network``: a :class:`ContrastiveTrainingModule` (possibly DDP-wrapped)."""

    def __init__(self, precision: str = "auto") -> None:
        super().__init__()
        self.precision = precision

    def __call__(self, inputs: Mapping[str, Any], network: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _autocast(_batch_device(inputs), self.precision):
            return network(inputs, *args, **kwargs)


class OutputLoss:
    """The engine's ``loss_function``: the ``"loss"`` the training module computed in its forward."""

    def __call__(self, pred: Mapping[str, Any], targets: Any = None) -> torch.Tensor:
        return pred["loss"]


def loss_terms_of(output: Any) -> dict[str, float]:
    """``{"loss": total, "loss_<level>": term, ...}`` of a trainer output (``output_transform`` for the loggers)."""
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        output = output[0]
    out = {"loss": float(output["loss"].item() if hasattr(output["loss"], "item") else output["loss"])}
    pred = output.get("pred") if isinstance(output, Mapping) else None
    if isinstance(pred, Mapping):
        out.update({f"loss_{k}": float(v) for k, v in pred.get("terms", {}).items()})
    return out


# ------------------------------------------------------------------------------------------------ retrieval
def _hit_probability(greater: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """P(true item in the top ``k``) when ``greater`` others score above it and ``ties`` others equal it, ties
    broken at random: a collapsed model (all scores equal) gets the chance value, not a perfect score."""
    return ((k - greater.float()) / (ties.float() + 1.0)).clamp(0.0, 1.0)


@torch.no_grad()
def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, image_group: torch.Tensor,
                      text_group: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image -> report and report -> image recall@K over the **unique** reports, by cosine similarity.

    image_embeds (N, P), text_embeds (T, P), image_group (N,), text_group (T,): int64 ids of the report text
    (``group_ids``), equal for identical texts. Texts with the same group count once (U unique reports), so the many
    identical "normal" reports are one target, not U competing ones.

    - ``i2t_r{k}``: fraction of images whose own report is among the ``k`` reports most similar to it
      (chance ``k / U``: ``i2t_r{k}_chance``).
    - ``t2i_r{k}``: fraction of unique reports with one of their images among the ``k`` most similar images
      (chance ``1 - C(N - n, k) / C(N, k)`` for a report with ``n`` images, averaged: ``t2i_r{k}_chance``).

    Ties are broken at random in expectation (:func:`_hit_probability`). Also returns ``n_images``,
    ``n_unique_reports``.
    """
    img = F.normalize(image_embeds.detach().float().cpu(), dim=-1)
    txt = F.normalize(text_embeds.detach().float().cpu(), dim=-1)
    image_group, text_group = image_group.detach().cpu().long(), text_group.detach().cpu().long()
    groups, inverse = torch.unique(text_group, return_inverse=True)
    first = torch.full((len(groups),), len(text_group), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(text_group)), reduce="amin")
    txt_u = txt[first]                                  # (U, P)
    sim = img @ txt_u.T                                 # (N, U)
    own = image_group[:, None] == groups[None, :]       # (N, U)
    keep = own.any(1)                                   # images whose report is among the texts
    n, u = int(keep.sum()), len(groups)
    out: dict[str, float] = {"n_images": float(n), "n_unique_reports": float(u)}
    if n == 0 or u == 0:
        return out
    sim_k, own_k, grp_k = sim[keep], own[keep], image_group[keep]
    own_score = (sim_k * own_k).sum(1, keepdim=True)    # one own column per image
    i2t_greater = ((sim_k > own_score) & ~own_k).sum(1)
    i2t_ties = ((sim_k == own_score) & ~own_k).sum(1)
    # report -> image: per unique report with images, its best-scoring own image against the others
    pos = grp_k[:, None] == groups[None, :]             # (n, U)
    has = pos.any(0)
    sim_t = sim_k.T[has]                                # (U', n)
    pos_t = pos.T[has]
    best = sim_t.masked_fill(~pos_t, -math.inf).max(1, keepdim=True).values
    t2i_greater = ((sim_t > best) & ~pos_t).sum(1)
    t2i_ties = ((sim_t == best) & ~pos_t).sum(1)
    n_pos = pos_t.sum(1)
    for k in ks:
        k = int(k)
        out[f"i2t_r{k}"] = float(_hit_probability(i2t_greater, i2t_ties, k).mean())
        out[f"i2t_r{k}_chance"] = min(1.0, k / u)
        out[f"t2i_r{k}"] = float(_hit_probability(t2i_greater, t2i_ties, k).mean())
        chance = [1.0 - (math.comb(n - int(p), k) / math.comb(n, k) if n >= k else 0.0) for p in n_pos]
        out[f"t2i_r{k}_chance"] = float(np.mean(chance)) if chance else 0.0
    return out


class ContrastiveValidation:
    """Every ``interval`` epochs (and at the end): held-out loss and retrieval per level.

    Runs the model (``network.model`` of the trainer's :class:`ContrastiveTrainingModule`) in eval mode over
    ``data_loader`` on rank 0 (the other ranks wait), without the feature queue and without gathering. Metrics go to
    ``engine.state.metrics``: ``val_loss`` (mean over batches of the weighted sum), ``val_loss_<level>``,
    ``val_<level>_{i2t,t2i}_r{k}`` and their ``..._chance`` (:func:`retrieval_metrics` over the whole held-out set),
    and ``val_i2t_r{k}`` / ``val_t2i_r{k}`` (+ ``_chance``) for the scan level. The training RNG states are restored
    afterwards, so validating never changes the training run (a resumed run validates at other moments).
    """

    def __init__(self, data_loader: Any, interval: int = 1, prepare_batch: Any = None, ks: Sequence[int] = (1, 5),
                 precision: str = "auto") -> None:
        self.data_loader, self.interval = data_loader, max(1, int(interval))
        self.prepare_batch = prepare_batch or PrepareBatchCLIP()
        self.ks, self.precision = tuple(int(k) for k in ks), precision
        self._validated_at = -1
        self.last: dict[str, float] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def _final(self, engine: Any) -> None:
        if self._validated_at != engine.state.iteration:
            self(engine)

    def __call__(self, engine: Any) -> dict[str, float]:
        from radfm3d.engine.handlers import rng_state, set_rng_state

        self._validated_at = engine.state.iteration
        rank, world = dist_info()
        metrics: dict[str, float] = {}
        if rank == 0:
            state = rng_state()
            try:
                metrics = self.evaluate(unwrap_model(engine.network), engine.state.device)
            finally:
                set_rng_state(state)
            engine.state.metrics.update(metrics)
            shown = {k: v for k, v in metrics.items() if not k.endswith("_chance") and "_n_" not in k}
            logger.info(f"epoch {engine.state.epoch} validation: "
                        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items())))
        if world > 1:
            torch.distributed.barrier()
        self.last = metrics
        return metrics

    @torch.no_grad()
    def evaluate(self, module: nn.Module, device: torch.device | str | None = None) -> dict[str, float]:
        """The metrics of ``module`` (a :class:`ContrastiveTrainingModule`, or a bare model) over the loader."""
        from radfm3d.contrastive.configuration import LEVELS

        model = getattr(module, "model", module)
        loss_fn = _build_loss(model, queue_size=0, gather=False).to(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        totals: list[float] = []
        terms: dict[str, list[float]] = {}
        parts: dict[str, list[list[torch.Tensor]]] = {}
        try:
            for batch in self.data_loader:
                prepared, _, _, _ = self.prepare_batch(batch, device)
                with _autocast(_batch_device(prepared), self.precision):
                    # every level, also one the training leaves out (weight 0): its retrieval is still reported
                    levels = model.encode_batch(prepared, level_weights={level: 1.0 for level in LEVELS})
                levels, scale = _float_levels(levels)
                total, level_terms = loss_fn(levels, logit_scale=scale)
                totals.append(float(total))
                for level, value in level_terms.items():
                    terms.setdefault(level, []).append(float(value))
                for level, (img, txt, img_g, txt_g) in levels.items():
                    store = parts.setdefault(level, [[], [], [], []])
                    for i, t in enumerate((img, txt, img_g, txt_g)):
                        store[i].append(t.cpu())
        finally:
            model.train(was_training)
        metrics: dict[str, float] = {"val_loss": float(np.mean(totals)) if totals else float("nan")}
        metrics.update({f"val_loss_{k}": float(np.mean(v)) for k, v in terms.items()})
        for level, store in parts.items():
            img, txt, img_g, txt_g = (torch.cat(s) for s in store)
            if len(img) == 0 or len(txt) == 0:
                continue
            for key, value in retrieval_metrics(img, txt, img_g, txt_g, self.ks).items():
                metrics[f"val_{level}_{key}"] = value
        for k in self.ks:
            for key in (f"i2t_r{k}", f"t2i_r{k}", f"i2t_r{k}_chance", f"t2i_r{k}_chance"):
                if f"val_scan_{key}" in metrics:
                    metrics[f"val_{key}"] = metrics[f"val_scan_{key}"]
        return metrics


# ------------------------------------------------------------------------------------------------ export
def export_clip_model(network: nn.Module, out_dir: str | os.PathLike, processor: Any = None) -> Path:
    """``save_pretrained`` (+ ``processor.save_pretrained``) into a hidden sibling folder, then moved onto
    ``out_dir`` (an existing folder is moved aside first, then removed): ``out_dir`` is never half written."""
    with staged_folder(out_dir) as partial:
        unwrap_model(network).save_pretrained(partial)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(partial)
    return Path(out_dir)


class CLIPExport:
    """On ``COMPLETED`` (also after a ``TimeLimit`` stop), :func:`export_clip_model` the trained model (rank 0)."""

    def __init__(self, network: nn.Module, export_dir: str | os.PathLike, processor: Any = None) -> None:
        self.network, self.export_dir, self.processor = network, Path(export_dir), processor

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self.export)

    def export(self, engine: Any = None) -> Path | None:
        if dist_info()[0] != 0:
            return None
        path = export_clip_model(self.network, self.export_dir, self.processor)
        logger.info(f"trained CLIP model exported to {path}")
        return path


# ------------------------------------------------------------------------------------------------ evaluation
def run_evaluate_clip(models: Mapping[str, str | os.PathLike], manifest: str | os.PathLike,
                      out_dir: str | os.PathLike, train_manifest: str | os.PathLike | None = None,
                      label_schema: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 8,
                      n_resamples: int | None = None, device: str = "cpu") -> int:
    """``radfm3d evaluate-clip`` (:func:`radfm3d.contrastive.evaluate.cli`) on ``models`` (name -> CLIP model
    folder; several give one table, e.g. a level ablation) against ``manifest``; writes ``results.json``,
    ``report.md`` and plots to ``out_dir``. Returns the harness's exit status (1: some records could not be
    embedded; they are listed in ``failures.json`` and the others are scored)."""
    from radfm3d.contrastive.evaluate import cli

    argv: list[str] = []
    for name, folder in dict(models).items():
        argv += ["--model", f"{name}={folder}"]
    argv += ["--manifest", str(manifest), "--out", str(out_dir), "--batch-size", str(int(batch_size)),
             "--device", str(device)]
    if train_manifest and Path(train_manifest).is_file():
        argv += ["--train-manifest", str(train_manifest)]
    if label_schema:
        argv += ["--label-schema", str(label_schema)]
    if limit is not None:
        argv += ["--limit", str(int(limit))]
    if n_resamples is not None:
        argv += ["--n-resamples", str(int(n_resamples))]
    status = cli(argv)
    if status:
        logger.warning(f"evaluate-clip: some records could not be embedded (see {Path(out_dir) / 'failures.json'})")
    return status


# ------------------------------------------------------------------------------------------------ inference
def embedding_records(manifest: str | os.PathLike | None = None, scans: Sequence[str | os.PathLike] = (),
                      names: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
    """What the inference config embeds, as records ``{"id", "images", "answer"}``.

    ``manifest``: its records with images and a report (``radfm3d.contrastive.data.clip_records``; ``tasks``
    default report + study_report): one image embedding per record (a study's series fused) and one text
    embedding of its report. Otherwise ``scans`` (files or DICOM folders; the bundle finds them with
    ``radfm3d.inference.find_scans``), one record per scan without a report, ids from ``names`` (default the paths).
    """
    if manifest:
        from radfm3d.contrastive.data import CLIP_TASKS, clip_records

        records = clip_records(manifest, tasks=CLIP_TASKS if tasks is None else tasks, limit=limit)
        return [{"id": str(r.get("id", i)), "images": list(r["images"]), "answer": str(r.get("answer", "")),
                 **{k: r[k] for k in ("image_series", "image_meta", "image_modalities") if k in r}}
                for i, r in enumerate(records)]
    scans = [str(s) for s in scans]
    if not scans:
        from radfm3d.errors import RadFM3DInputError

        raise RadFM3DInputError("inference", "nothing to embed: give a manifest or scans")
    ids = list(names) if names is not None else scans
    records = [{"id": str(name), "images": [scan], "answer": ""} for scan, name in zip(scans, ids)]
    return records[: int(limit)] if limit is not None else records


class EmbeddingCollate:
    """Records of :func:`embedding_records` -> ``pixel_values (B, S, C, H, W, D)``, ``image_mask (B, S)``,
    ``report_input_ids`` / ``report_attention_mask`` (B, L) when the records have reports, ``ids``, ``texts``.

    Images are read and preprocessed as for training (``radfm3d.contrastive.data.ClipCollate``: same recipe, same
    optional preprocessed-image cache); report sentences and their boxes are not needed here.
    """

    def __init__(self, tokenizer: Any, recipe: Any = None, image_cache_dir: str | os.PathLike | None = None,
                 max_text_length: int = 128) -> None:
        from radfm3d.contrastive.data import ClipCollate

        self.collate = ClipCollate(tokenizer, recipe, image_cache_dir=image_cache_dir, max_text_length=max_text_length)

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        texts = [str(r.get("answer", "")) for r in records]
        batch = self.collate([{k: v for k, v in r.items() if k != "report_structures"} for r in records])
        out = {"pixel_values": batch["pixel_values"], "image_mask": batch["image_mask"],
               "ids": [str(r["id"]) for r in records], "texts": texts}
        if any(t.strip() for t in texts):
            out["report_input_ids"] = batch["report_input_ids"]
            out["report_attention_mask"] = batch["report_attention_mask"]
        return out


class EmbeddingInferer(Inferer):
    """Batch of :class:`EmbeddingCollate` -> ``{"image_embeds" (B, P), "text_embeds" (B, P) | None}``,
    L2-normalised float32.

    An item with one series is embedded as one volume (``get_image_features`` of (B, C, H, W, D), the scan level of
    training); items with several series as a study (the model's study fusion over the present series). Reports:
    ``get_text_features``.
    """

    def __init__(self, precision: str = "auto") -> None:
        super().__init__()
        self.precision = precision

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Any], network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        model = unwrap_model(network)
        model = getattr(model, "model", model)
        model.eval()
        pixels = inputs["pixel_values"]
        if pixels.ndim == 5:
            pixels = pixels.unsqueeze(1)
        mask = checked_image_mask(pixels, inputs.get("image_mask"))
        out: dict[str, Any] = {"text_embeds": None}
        with _autocast(_batch_device(inputs), self.precision):
            counts = mask.sum(1)
            feats = torch.zeros(pixels.shape[0], model.config.projection_dim, device=pixels.device)
            single = counts == 1
            if bool(single.any()):
                first = mask[single].float().argmax(1)  # the one present series
                feats[single] = model.get_image_features(pixels[single][torch.arange(len(first)), first]).float()
            if bool((~single).any()):
                feats[~single] = model.get_image_features(pixels[~single], mask[~single]).float()
            out["image_embeds"] = F.normalize(feats, dim=-1)
            if inputs.get("report_input_ids") is not None:
                text = model.get_text_features(inputs["report_input_ids"], inputs.get("report_attention_mask"))
                out["text_embeds"] = F.normalize(text.float(), dim=-1)
        return out


class EmbeddingWriter:
    """Collect the embeddings of every batch; on ``COMPLETED`` write ``output_file`` (``embeddings.npz``) atomically.

    Arrays as the evaluate-clip harness reads them (``np.savez``, ``allow_pickle=False``, strings as ``<U``):
    ``record_ids`` (N,), ``image_embeds`` (N, P), and with reports ``report_texts`` (N,) + ``text_embeds`` (N, P).
    ``texts`` (optional, e.g. zero-shot prompts or queries): embedded once with ``tokenizer`` into
    ``query_texts`` (K,) + ``query_embeds`` (K, P).
    """

    def __init__(self, output_file: str | os.PathLike, texts: Sequence[str] | None = None, tokenizer: Any = None,
                 max_text_length: int = 128, precision: str = "auto") -> None:
        self.output_file = Path(output_file)
        self.texts = [str(t) for t in texts] if texts else []
        if self.texts and tokenizer is None:
            raise ValueError("EmbeddingWriter: texts need the tokenizer")
        self.tokenizer, self.max_text_length, self.precision = tokenizer, int(max_text_length), precision
        self._reset()

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _reset(self, engine: Any = None) -> None:
        self.ids: list[str] = []
        self.report_texts: list[str] = []
        self.image: list[np.ndarray] = []
        self.text: list[np.ndarray] = []

    def collect(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        pred = output["pred"] if isinstance(output, Mapping) and "pred" in output else output
        self.ids.extend(str(i) for i in batch["ids"])
        self.image.append(pred["image_embeds"].cpu().numpy())
        if pred.get("text_embeds") is not None:
            self.text.append(pred["text_embeds"].cpu().numpy())
            self.report_texts.extend(str(t) for t in batch["texts"])

    def write(self, engine: Any = None) -> Path:
        from radfm3d.utils import atomic_write

        arrays: dict[str, np.ndarray] = {"record_ids": np.asarray(self.ids, dtype=str)}
        if self.image:
            arrays["image_embeds"] = np.concatenate(self.image).astype(np.float32)
        if self.text and len(self.report_texts) == len(self.ids):
            arrays["report_texts"] = np.asarray(self.report_texts, dtype=str)
            arrays["text_embeds"] = np.concatenate(self.text).astype(np.float32)
        if self.texts and engine is not None:
            arrays["query_texts"] = np.asarray(self.texts, dtype=str)
            arrays["query_embeds"] = self.embed_texts(engine.network)
        self.output_file.parent.mkdir(parents=True, exist_ok=True)

        def _save(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, allow_pickle=False, **arrays)

        atomic_write(self.output_file, _save)
        logger.info(f"embeddings of {len(self.ids)} records written to {self.output_file}")
        return self.output_file

    @torch.no_grad()
    def embed_texts(self, network: nn.Module) -> np.ndarray:
        """``texts`` -> (K, P) L2-normalised embeddings."""
        model = unwrap_model(network)
        model = getattr(model, "model", model)
        model.eval()
        enc = self.tokenizer(self.texts, padding=True, truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        device = next(model.parameters()).device
        with _autocast(device, self.precision):
            feats = model.get_text_features(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()
