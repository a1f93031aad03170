# Copyright (c) radfm3d contributors. Apache-2.0.
"""Stage 0 (vision pre-training): teach the encoder + resampler a scan's structured content before the LLM stage.

Run by the bundle's ``pretrain_vision.json`` with MONAI's ``SupervisedTrainer`` (same checkpointer, progress bar
and TensorBoard handlers as the language stages). The network is :class:`radfm3d.findings.heads.VisionPretrainingModel`
(vision encoder + resampler + :class:`~radfm3d.findings.heads.StructuredFindingsHead` sized by the label schema; the
LLM is untouched), the data are the images of ``cases.jsonl`` with :func:`radfm3d.findings.labels.labels_for_image`,
read through the :class:`radfm3d.data.cache.PreprocessedImageCache`. The exported folder is a complete
``RadFM3DForCausalLM`` (plus ``structured_head.safetensors`` and ``label_schema.json``) that the findings reader is
attached from (``radfm3d findings-prompt``) and the instruction stage (``train.json``) starts from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import Dataset
from monai.engines.utils import PrepareBatch
from torch import nn

from radfm3d.findings.box_snapping import box_iou
from radfm3d.findings.labels import IGNORE
from radfm3d.findings.schema import LabelSchema, load_schema

__all__ = [
    "CachedImageLabel",
    "build_structured_dataset",
    "PrepareBatchStructured",
    "StructuredLoss",
    "structured_metrics",
    "StructuredValidation",
    "build_pretraining_model",
]

logger = logging.getLogger(__name__)


class CachedImageLabel:
    """``{"image": path, "label": {...}}`` -> ``{"image": (C, H, W, D) float32, "label": {...}, "id": ...}``."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        image = self.cache(record["image"])
        return {"image": image.as_tensor(), "label": dict(record["label"]), "id": record.get("id", "")}


def build_structured_dataset(
    cases_file: str | os.PathLike, recipe: Any, cache_dir: str | os.PathLike,
    schema: LabelSchema | str | os.PathLike, split: str | None = "train", include_priors: bool = True,
    limit: int | None = None, warm_workers: int = 0,
) -> Dataset:
    """A MONAI ``Dataset`` of (preprocessed image, structured labels of ``schema``) for one split of ``cases.jsonl``.

    ``recipe``: a ``PreprocessingRecipe``, its dict or a ``preprocessing.json`` path; ``schema``: a
    :class:`~radfm3d.findings.schema.LabelSchema` or its JSON file. ``warm_workers > 0`` fills the image cache up
    front (with a progress bar) instead of during the first epoch.
    """
    from radfm3d.data.cache import PreprocessedImageCache
    from radfm3d.findings.labels import structured_records
    from radfm3d.transforms import PreprocessingRecipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = PreprocessingRecipe.load(recipe)
    cache = PreprocessedImageCache(cache_dir, recipe)
    records = structured_records(cases_file, load_schema(schema), split=split, include_priors=include_priors)
    if limit is not None:
        records = records[: int(limit)]
    if warm_workers:
        cache.warm([r["image"] for r in records], num_workers=int(warm_workers))
    return Dataset(records, transform=CachedImageLabel(cache))


class PrepareBatchStructured(PrepareBatch):
    """Collated ``{"image": (B, C, H, W, D), "label": {key: (B, ...)}}`` -> ``(image, label dict, (), {})`` on
    ``device``."""

    def __call__(self, batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, dict, tuple, dict]:
        def move(t: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(t)
            return t.to(device=device, non_blocking=non_blocking) if device is not None else t

        return move(batchdata["image"]), {k: move(v) for k, v in batchdata["label"].items()}, (), {}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class StructuredLoss(nn.Module):
    """Sum of the structured objectives present in the predictions and labels: cross-entropy for classes
    (modality, region, counts, finding type), BCE for presence and per-scan flags, L1 on [0, 1] boxes scaled by
    ``box_weight``, smooth L1 on log sizes; each averaged over its supervised entries. Returns a scalar."""

    def __init__(self, box_weight: float = 5.0) -> None:
        super().__init__()
        self.box_weight = float(box_weight)

    def terms(self, pred: Mapping[str, torch.Tensor], label: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for key in ("modality", "region", "total_count"):
            if key in pred:
                terms[key] = F.cross_entropy(pred[key], label[key])
        if "flags" in pred:
            terms["flags"] = F.binary_cross_entropy_with_logits(pred["flags"], label["flags"])
        if "structure_present" not in pred:
            return terms
        present = label["structure_present"]
        terms["structure_present"] = F.binary_cross_entropy_with_logits(pred["structure_present"], present)
        if "structure_box" in pred:
            terms["structure_box"] = self.box_weight * _masked_mean(
                (pred["structure_box"] - label["structure_box"]).abs().mean(-1), label["structure_box_mask"])
        if "finding_present" in pred:
            terms["finding_present"] = _masked_mean(F.binary_cross_entropy_with_logits(
                pred["finding_present"], label["finding_present"], reduction="none"), present)
        if "finding_count" in pred:
            terms["finding_count"] = F.cross_entropy(pred["finding_count"].flatten(0, 1),
                                                     label["finding_count"].flatten(), ignore_index=IGNORE)
        if "finding_box" in pred:
            terms["finding_box"] = self.box_weight * _masked_mean(
                (pred["finding_box"] - label["finding_box"]).abs().mean(-1), label["finding_mask"])
        if "finding_size" in pred:
            terms["finding_size"] = _masked_mean(F.smooth_l1_loss(pred["finding_size"], label["finding_size"],
                                                                  reduction="none"), label["finding_mask"])
        if "finding_type" in pred and (label["finding_type"] != IGNORE).any():
            terms["finding_type"] = F.cross_entropy(pred["finding_type"].flatten(0, 1),
                                                    label["finding_type"].flatten(), ignore_index=IGNORE)
        return terms

    def forward(self, pred: Mapping[str, torch.Tensor], label: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.terms(pred, label).values())).sum()


@torch.no_grad()
def structured_metrics(pred: Mapping[str, torch.Tensor], label: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Accuracies and box IoU of one (or a concatenated) batch, for what the head outputs: modality, region, flag
    accuracy (logit > 0), finding presence per structure in the region, largest-finding type, structure / finding box
    IoU and hit@0.3."""
    out: dict[str, torch.Tensor] = {}
    for key in ("modality", "region"):
        if key in pred:
            out[f"{key}_acc"] = (pred[key].argmax(-1) == label[key]).float().mean()
    if "flags" in pred:
        out["flag_acc"] = ((pred["flags"] > 0) == (label["flags"] > 0)).float().mean()
    if "finding_present" in pred:
        present = label["structure_present"] > 0
        out["finding_present_acc"] = ((pred["finding_present"] > 0) == (label["finding_present"] > 0))[present] \
            .float().mean()
    if "finding_type" in pred:
        typed = label["finding_type"] != IGNORE
        if typed.any():
            out["finding_type_acc"] = (pred["finding_type"].argmax(-1) == label["finding_type"])[typed].float().mean()
    for kind, mask_key in (("structure", "structure_box_mask"), ("finding", "finding_mask")):
        if f"{kind}_box" in pred and mask_key in label and (label[mask_key] > 0).any():
            mask = label[mask_key] > 0
            iou = box_iou(pred[f"{kind}_box"], label[f"{kind}_box"])[mask]
            out[f"{kind}_box_iou"], out[f"{kind}_hit@0.3"] = iou.mean(), (iou >= 0.3).float().mean()
    return {k: float(v) for k, v in out.items()}


class StructuredValidation:
    """Every ``interval`` epochs (and at the end), run the network over ``data_loader`` and log
    :func:`structured_metrics`; the numbers also land in ``engine.state.metrics`` (``val_...``)."""

    def __init__(self, data_loader: Any, interval: int = 1, prepare_batch: Any = None) -> None:
        self.data_loader, self.interval = data_loader, max(1, int(interval))
        self.prepare_batch = prepare_batch or PrepareBatchStructured()
        self._validated_at = -1

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def _final(self, engine: Any) -> None:
        if self._validated_at != engine.state.iteration:  # the last epoch was not a multiple of interval, or a stop
            self(engine)

    def __call__(self, engine: Any) -> dict[str, float]:
        self._validated_at = engine.state.iteration
        network = engine.network
        was_training = network.training
        network.eval()
        preds: dict[str, list[torch.Tensor]] = {}
        labels: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for batch in self.data_loader:
                image, label, _, _ = self.prepare_batch(batch, engine.state.device)
                for k, v in network(image).items():
                    preds.setdefault(k, []).append(v.cpu())
                for k, v in label.items():
                    labels.setdefault(k, []).append(v.cpu())
        network.train(was_training)
        metrics = structured_metrics({k: torch.cat(v) for k, v in preds.items()},
                                     {k: torch.cat(v) for k, v in labels.items()})
        engine.state.metrics.update({f"val_{k}": v for k, v in metrics.items()})
        logger.info(f"epoch {engine.state.epoch} validation: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics


def build_pretraining_model(name_or_path: str | os.PathLike, schema: LabelSchema | str | os.PathLike,
                            device: str | torch.device = "cpu", seed: int = 0,
                            parts: Sequence[str] = ("vision", "resampler"), load_text_weights: bool = True,
                            train_heads: bool = True, head_hidden: int = 512) -> nn.Module:
    """``VisionPretrainingModel`` over ``build_model(name_or_path)`` with a head for ``schema`` (a
    :class:`~radfm3d.findings.schema.LabelSchema` or its JSON file): ``parts`` train (default vision encoder and
    resampler), everything else of the VLM is frozen; the head trains unless ``train_heads=False``. The head starts
    from the folder's ``structured_head.safetensors`` when it has one, else from the folder's findings reader when it
    is a findings model with the same schema.

    ``load_text_weights=False`` skips loading the base LLM (this stage never runs it; the exported folder still names
    it). Start such a run from a saved folder, so the image-token rows it exports come from the real base."""
    from radfm3d.engine.training import MODEL_PARTS, build_model, set_trainable
    from radfm3d.findings.heads import VisionPretrainingModel, read_head_file

    schema = load_schema(schema)
    model = build_model(name_or_path, device="cpu", seed=seed, load_text_weights=bool(load_text_weights))
    if not load_text_weights:
        logger.info("base LLM not loaded (load_text_weights=false): random LLM weights, unused by this stage")
    reader = getattr(model, "reader", None)
    set_trainable(model, **{name: name in parts for name in MODEL_PARTS})
    hidden = int(reader.settings["head_hidden"]) if reader is not None else int(head_hidden)
    wrapper = VisionPretrainingModel(model, schema, hidden=hidden)
    head_file = Path(str(name_or_path)) / VisionPretrainingModel.head_file
    if head_file.is_file():  # continuing from an earlier pre-training run: keep its head too
        wrapper.load_head_state(read_head_file(head_file), source=str(head_file))
        logger.info(f"head loaded from {head_file}")
    elif reader is not None and reader.schema == schema:
        wrapper.head.load_state_dict(reader.head.state_dict())
        logger.info(f"head loaded from the findings reader of {name_or_path}")
    wrapper.head.requires_grad_(bool(train_heads))
    return wrapper.to(device).train()
