# Copyright (c) radfm3d contributors. Apache-2.0.
"""Vision pre-training stage: teach the encoder + resampler the scan's structured content before the LLM stage.

Run by the bundle's ``pretrain_vision.json`` with MONAI's ``SupervisedTrainer`` (same checkpointer, progress bar
and TensorBoard handlers as the language stages). The network is :class:`radfm3d.modeling.heads.VisionPretrainingModel`
(vision encoder + resampler + :class:`~radfm3d.modeling.heads.StructuredFindingsHead`; the LLM is untouched), the
data are the images of ``cases.jsonl`` with :func:`radfm3d.data.structured_labels.labels_for_image`, read through
the :class:`radfm3d.data.cache.PreprocessedImageCache`. The exported folder is a complete ``RadFM3DForCausalLM``
that the instruction stage (``train.json``) starts from.
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

from radfm3d.data.structured_labels import IGNORE
from radfm3d.modeling.box_snapping import box_iou

__all__ = [
    "CachedImageLabel",
    "FindingCrops",
    "FindingCropDataset",
    "build_structured_dataset",
    "PrepareBatchStructured",
    "patch_targets",
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


class FindingCrops:
    """``{"image": (C, H, W, D), "label": {...}}`` -> ``num_samples`` crops ``{"image": (C, h, w, d), "label": {...}}``
    whose ``findings_box`` is re-expressed in crop units (a box may reach outside [0, 1]: :func:`patch_targets` still
    measures its overlap with each cell correctly; the other label entries are kept as they are).

    With probability ``positive_fraction`` a crop is centred on one of the scan's findings (uniform among them) moved
    by up to ``jitter`` voxels per axis, else placed uniformly; its corner is rounded to a multiple of ``align``
    (the detector's cell, so crop cells are whole-scan cells) and kept inside the scan. Why: findings fill well
    under 1% of a scan, so whole-scan batches spend almost all their compute on empty cells; a 64x64x16 crop costs
    the detector ~18 ms on 2 CPU cores against ~160 ms for a whole scan behind the encoder pass (bundle docs), and
    most crops hold a finding.
    """

    def __init__(self, crop_size: Sequence[int], num_samples: int = 4, positive_fraction: float = 0.7,
                 align: Sequence[int] = (8, 8, 4), jitter: Sequence[float] = (20.0, 20.0, 5.0)) -> None:
        self.crop_size = tuple(int(c) for c in crop_size)
        self.align = tuple(int(a) for a in align)
        if len(self.crop_size) != 3 or len(self.align) != 3:
            raise ValueError(f"finding crops: crop_size and align need 3 values, got {crop_size} / {align}")
        if any(c % a for c, a in zip(self.crop_size, self.align)):
            raise ValueError(f"finding crops: crop_size {self.crop_size} must be a multiple of align {self.align}")
        self.num_samples, self.positive_fraction = int(num_samples), float(positive_fraction)
        self.jitter = tuple(float(j) for j in jitter)

    def __call__(self, item: Mapping[str, Any], rng: Any) -> list[dict[str, Any]]:
        """``rng``: a ``numpy.random.Generator`` (the caller seeds it, so crops are reproducible)."""
        import numpy as np

        image, label = item["image"], item["label"]
        full = np.array(image.shape[-3:], dtype=np.float64)
        crop, align = np.array(self.crop_size, dtype=np.float64), np.array(self.align, dtype=np.float64)
        if (crop > full).any():
            raise ValueError(f"finding crops: crop_size {self.crop_size} is larger than the image {tuple(full)}")
        boxes = label["findings_box"]  # (F, 6) in unit scan coordinates
        to_voxels = torch.tensor(np.tile(full, 2), dtype=boxes.dtype)
        crop_voxels = torch.tensor(np.tile(crop, 2), dtype=boxes.dtype)
        real = np.flatnonzero(np.asarray(label["findings_type"]) != IGNORE)
        crops = []
        for _ in range(self.num_samples):
            if len(real) and rng.random() < self.positive_fraction:
                box = boxes[int(rng.choice(real))].double().numpy()
                corner = (box[:3] + box[3:]) / 2 * full - crop / 2 + rng.uniform(-1, 1, 3) * self.jitter
            else:
                corner = rng.uniform(0, 1, 3) * (full - crop)
            corner = np.clip(np.round(corner / align) * align, 0, full - crop).astype(int)
            (h, w, d), (ch, cw, cd) = corner, self.crop_size
            in_crop = (boxes * to_voxels - torch.tensor(np.tile(corner, 2), dtype=boxes.dtype)) / crop_voxels
            crops.append({"image": image[..., h:h + ch, w:w + cw, d:d + cd].clone(),
                          "label": {**label, "findings_box": in_crop}, "id": item.get("id", "")})
        return crops


class FindingCropDataset(Dataset):
    """The structured dataset, each item being a list of :class:`FindingCrops` crops of one scan (collate with
    ``monai.data.list_data_collate``). The crops of item ``i`` in epoch ``e`` are fixed by ``(seed, e, i)``:
    :class:`radfm3d.engine.data.ResumableSampler` passes the epoch on, so a resumed run draws the same crops."""

    def __init__(self, data: Sequence[Any], transform: Any, crops: FindingCrops, seed: int = 0) -> None:
        super().__init__(data, transform=transform)
        self.crops, self.seed, self.epoch = crops, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _transform(self, index: int) -> list[dict[str, Any]]:
        import numpy as np

        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return self.crops(super()._transform(index), rng)


def build_structured_dataset(
    cases_file: str | os.PathLike, recipe: Any, cache_dir: str | os.PathLike, split: str | None = "train",
    include_priors: bool = True, limit: int | None = None, warm_workers: int = 0,
    crop_size: Sequence[int] | None = None, crop_samples: int = 4, crop_positive_fraction: float = 0.7,
    crop_align: Sequence[int] = (8, 8, 4), seed: int = 0,
) -> Dataset:
    """A MONAI ``Dataset`` of (preprocessed image, structured labels) for one split of ``cases.jsonl``.

    ``recipe``: a ``PreprocessingRecipe``, its dict or a ``preprocessing.json`` path. ``warm_workers > 0`` fills the
    image cache up front (with a progress bar) instead of during the first epoch. ``crop_size (h, w, d)``: each item
    is instead ``crop_samples`` finding-centred crops of the scan (:class:`FindingCrops`, for training the finding
    detector alone; not for the ViT, whose input grid is fixed).
    """
    from radfm3d.data.cache import PreprocessedImageCache
    from radfm3d.data.structured_labels import structured_records
    from radfm3d.transforms import PreprocessingRecipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = PreprocessingRecipe.load(recipe)
    cache = PreprocessedImageCache(cache_dir, recipe)
    records = structured_records(cases_file, split=split, include_priors=include_priors)
    if limit is not None:
        records = records[: int(limit)]
    if warm_workers:
        cache.warm([r["image"] for r in records], num_workers=int(warm_workers))
    if crop_size is not None:
        crops = FindingCrops(crop_size, crop_samples, crop_positive_fraction, crop_align)
        return FindingCropDataset(records, CachedImageLabel(cache), crops, seed=seed)
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


def patch_targets(findings_box: torch.Tensor, findings_type: torch.Tensor, grid: Sequence[int],
                  min_fraction: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Which patches hold a finding: ``findings_box (B, F, 6)`` in [0, 1] grid units, ``findings_type (B, F)`` (-100 =
    empty slot), patch ``grid (nh, nw, nd)`` -> ``(positive (B, T) bool, type (B, T) long, -100 where none)`` with
    ``T = nh*nw*nd`` in the encoder's ``(h w d)`` token order.

    A patch is positive when it holds the finding's centre or at least ``min_fraction`` of its box volume; where
    findings share a patch, the largest one (first slot) gives the type.
    """
    nh, nw, nd = (int(g) for g in grid)
    device = findings_box.device
    axes = [torch.arange(n, device=device, dtype=findings_box.dtype) / n for n in (nh, nw, nd)]
    lo = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (T, 3)
    hi = lo + torch.tensor([1.0 / nh, 1.0 / nw, 1.0 / nd], device=device, dtype=findings_box.dtype)
    b_lo, b_hi = findings_box[..., None, :3], findings_box[..., None, 3:]  # (B, F, 1, 3)
    overlap = (torch.minimum(hi, b_hi) - torch.maximum(lo, b_lo)).clamp_min(0).prod(-1)  # (B, F, T)
    volume = (b_hi - b_lo).clamp_min(1e-9).prod(-1)  # (B, F, 1)
    centre = (b_lo + b_hi) / 2
    holds_centre = ((centre >= lo) & (centre < hi)).all(-1)
    hit = ((overlap / volume >= min_fraction) | holds_centre) & (findings_type[..., None] != IGNORE)
    positive = hit.any(1)
    types = torch.full(positive.shape, IGNORE, dtype=torch.long, device=device)
    for slot in reversed(range(findings_type.shape[1])):  # smaller findings first, the largest overwrites
        types = torch.where(hit[:, slot], findings_type[:, slot, None].expand_as(types), types)
    return positive, types


class StructuredLoss(nn.Module):
    """Sum of the structured objectives (cross-entropy for classes, BCE for presence, L1 on [0, 1] boxes scaled by
    ``box_weight``, smooth L1 on log sizes), each averaged over its supervised entries, plus, when the network gives
    ``patch_logits``, a per-patch finding objective (BCE with ``patch_pos_weight`` on positives, times
    ``patch_weight``; type cross-entropy on positive patches; see :func:`patch_targets`; ``patch_weight=0`` turns
    both off), and the same objective on a finding detector's ``detector_logits`` (times ``detector_weight``, with
    ``detector_pos_weight``, default ``patch_pos_weight``). A network that gives only the detector's outputs (a
    detector-only stage) gets only the detector's terms. Returns a scalar."""

    def __init__(self, box_weight: float = 5.0, patch_weight: float = 2.0, patch_pos_weight: float = 50.0,
                 detector_weight: float = 2.0, detector_pos_weight: float | None = None) -> None:
        super().__init__()
        self.box_weight = float(box_weight)
        self.patch_weight, self.patch_pos_weight = float(patch_weight), float(patch_pos_weight)
        self.detector_weight = float(detector_weight)
        self.pos_weights = {"patch": self.patch_pos_weight,
                            "detector": self.patch_pos_weight if detector_pos_weight is None
                            else float(detector_pos_weight)}

    def _cell_terms(self, name: str, weight: float, pred: Mapping[str, torch.Tensor],
                    label: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-cell finding objective of one finding map (``patch``: the ViT patch head; ``detector``: the
        finding detector on its own grid): weighted BCE "a finding is here" + type cross-entropy on positives."""
        positive, types = patch_targets(label["findings_box"], label["findings_type"], pred[f"{name}_grid"][0])
        logits = pred[f"{name}_logits"]
        pos_weight = torch.tensor(self.pos_weights[name], device=logits.device, dtype=logits.dtype)
        out = {f"{name}_finding": weight * F.binary_cross_entropy_with_logits(
            logits[..., 0], positive.to(logits.dtype), pos_weight=pos_weight)}
        if positive.any():
            out[f"{name}_type"] = F.cross_entropy(logits[..., 1:][positive], types[positive])
        return out

    def terms(self, pred: Mapping[str, torch.Tensor], label: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "modality" not in pred:  # detector only
            return self._cell_terms("detector", self.detector_weight, pred, label)
        present = label["structure_present"]
        terms = {
            "modality": F.cross_entropy(pred["modality"], label["modality"]),
            "region": F.cross_entropy(pred["region"], label["region"]),
            "total_count": F.cross_entropy(pred["total_count"], label["total_count"]),
            "structure_present": F.binary_cross_entropy_with_logits(pred["structure_present"], present),
            "finding_present": _masked_mean(F.binary_cross_entropy_with_logits(
                pred["finding_present"], label["finding_present"], reduction="none"), present),
            "finding_count": F.cross_entropy(pred["finding_count"].flatten(0, 1), label["finding_count"].flatten(),
                                             ignore_index=IGNORE),
            "structure_box": self.box_weight * _masked_mean(
                (pred["structure_box"] - label["structure_box"]).abs().mean(-1), label["structure_box_mask"]),
            "finding_box": self.box_weight * _masked_mean(
                (pred["finding_box"] - label["finding_box"]).abs().mean(-1), label["finding_mask"]),
            "finding_size": _masked_mean(F.smooth_l1_loss(pred["finding_size"], label["finding_size"],
                                                          reduction="none"), label["finding_mask"]),
        }
        if (label["finding_type"] != IGNORE).any():
            terms["finding_type"] = F.cross_entropy(pred["finding_type"].flatten(0, 1),
                                                    label["finding_type"].flatten(), ignore_index=IGNORE)
        if "findings_box" in label:
            for name, weight in (("patch", self.patch_weight), ("detector", self.detector_weight)):
                if weight > 0 and f"{name}_logits" in pred:
                    terms.update(self._cell_terms(name, weight, pred, label))
        return terms

    def forward(self, pred: Mapping[str, torch.Tensor], label: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.terms(pred, label).values())).sum()


@torch.no_grad()
def structured_metrics(pred: Mapping[str, torch.Tensor], label: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Accuracies and box IoU of one (or a concatenated) batch: modality, region, finding presence per structure in
    the region, largest-finding type, structure / finding box IoU and hit@0.3, recall / precision / type accuracy of
    the finding cells of the patch head and of the detector (logit > 0); only what the network outputs (a
    detector-only network: the detector's three)."""
    out: dict[str, torch.Tensor] = {}
    if "modality" in pred:  # not a detector-only network
        present = label["structure_present"] > 0
        out["modality_acc"] = (pred["modality"].argmax(-1) == label["modality"]).float().mean()
        out["region_acc"] = (pred["region"].argmax(-1) == label["region"]).float().mean()
        out["finding_present_acc"] = ((pred["finding_present"] > 0) == (label["finding_present"] > 0))[present] \
            .float().mean()
        typed = label["finding_type"] != IGNORE
        if typed.any():
            out["finding_type_acc"] = (pred["finding_type"].argmax(-1) == label["finding_type"])[typed].float().mean()
    for name in ("patch", "detector"):
        if f"{name}_logits" in pred and "findings_box" in label:
            positive, types = patch_targets(label["findings_box"], label["findings_type"], pred[f"{name}_grid"][0])
            said = pred[f"{name}_logits"][..., 0] > 0
            out[f"{name}_recall"] = (said & positive).sum() / positive.sum().clamp_min(1)
            out[f"{name}_precision"] = (said & positive).sum() / said.sum().clamp_min(1)
            if positive.any():
                out[f"{name}_type_acc"] = (pred[f"{name}_logits"][..., 1:].argmax(-1) == types)[positive].float().mean()
    for kind, mask in (("structure", label["structure_box_mask"] > 0), ("finding", label["finding_mask"] > 0)):
        if f"{kind}_box" in pred and mask.any():
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


def build_pretraining_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", seed: int = 0,
                            parts: Sequence[str] = ("vision", "resampler"), load_text_weights: bool = True,
                            detector: Mapping[str, Any] | bool | None = None, train_heads: bool = True,
                            detector_only: bool = False) -> nn.Module:
    """``VisionPretrainingModel`` over ``build_model(name_or_path)``: ``parts`` train (default vision encoder and
    resampler), everything else of the VLM is frozen; the heads train unless ``train_heads=False``.

    ``detector``: ``True`` or a (partial) :func:`radfm3d.modeling.detector.detector_config` adds a finding detector,
    which always trains (e.g. ``parts=[]``, ``train_heads=False``: only the detector learns; ``detector_only=True``
    also skips the encoder pass, so the detector can train on crops). The heads start from the
    folder's ``structured_head.safetensors`` when it has one, else from its findings prompt when it has one (a
    detector there is reused too).

    ``load_text_weights=False`` skips loading the base LLM (this stage never runs it; the exported folder still names
    it). Start such a run from a saved folder, so the image-token rows it exports come from the real base."""
    from radfm3d.engine.training import MODEL_PARTS, build_model, set_trainable
    from radfm3d.modeling.heads import VisionPretrainingModel, read_head_file

    if detector_only and (list(parts) or train_heads):
        raise ValueError(f"detector_only trains only the finding detector: set parts=[] and train_heads=false "
                         f"(got parts={list(parts)}, train_heads={train_heads})")
    model = build_model(name_or_path, device="cpu", seed=seed, load_text_weights=bool(load_text_weights))
    if not load_text_weights:
        logger.info("base LLM not loaded (load_text_weights=false): random LLM weights, unused by this stage")
    set_trainable(model, **{name: name in parts for name in MODEL_PARTS})
    prompter = getattr(model, "findings_prompter", None)
    head_file = Path(str(name_or_path)) / VisionPretrainingModel.head_file
    head_state, head_detector = read_head_file(head_file) if head_file.is_file() else (None, None)
    if detector is None and head_detector is not None:  # an earlier run's detector keeps training
        detector = head_detector
    if detector is None and prompter is not None and prompter.spec.get("detector"):
        detector = prompter.spec["detector"]
    if detector_only and not detector:
        detector = True
    wrapper = VisionPretrainingModel(model, detector=detector, detector_only=detector_only)
    if head_state is not None:  # continuing from an earlier pre-training run: keep its heads too
        missing = wrapper.load_head_state(head_state, strict=False, source=str(head_file))
        logger.info(f"heads loaded from {head_file}" + (f" (new: {missing})" if missing else ""))
    elif prompter is not None:  # a model with a findings prompt: its heads are the stage-0 heads
        state = {k: v for k, v in prompter.state_dict().items()
                 if not (k.startswith("detector.") and wrapper.detector is None)}
        wrapper.load_state_dict(state, strict=False)
        logger.info(f"heads loaded from the findings prompt of {name_or_path}")
    wrapper.head.requires_grad_(bool(train_heads))
    wrapper.patch_head.requires_grad_(bool(train_heads))
    return wrapper.to(device).train()


def attach_findings_prompt(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           heads_dir: str | os.PathLike | None = None, num_tokens: int | None = None,
                           threshold: float | None = None, replace: bool = False,
                           site_scores: str | None = None, test_time_shifts: Any = None,
                           snap_boxes: bool | None = None) -> Path:
    """Write ``out_dir``: the model of ``model_dir`` with a findings prompt (:mod:`radfm3d.modeling.findings_prompt`)
    built from the vision pre-training heads in ``heads_dir`` (default ``model_dir``; its
    ``structured_head.safetensors``, with the finding detector when the file has one), and its processor expanding
    each image to the visual tokens + ``num_tokens`` reading slots (default 24). ``replace=True``: a model that
    already has a findings prompt (e.g. after its LLM stage) gets the new heads instead, keeping its number of slots
    and, unless given, its threshold; its LLM side is untouched (without a head file, the model's own heads are kept:
    e.g. only a new threshold). ``site_scores``: ``"patch_map"`` or ``"head"`` (see
    :data:`radfm3d.modeling.findings_prompt.SITE_SCORES`; default: the replaced prompt's, else ``"patch_map"``).
    ``test_time_shifts``: voxel shifts whose head site scores are averaged with the scan's (``"2,2,0;-2,-2,0"`` or a
    list of triples; ``"none"`` removes them; default: the replaced prompt's; needs ``site_scores="head"``).
    ``snap_boxes``: ``generate`` moves the LLM's grounding boxes onto the head's finding boxes
    (:mod:`radfm3d.modeling.box_snapping`; default: the replaced prompt's, else off). The base LLM is not loaded
    (the folder still names it)."""
    from radfm3d.engine.training import load_processor
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.modeling.box_snapping import build_box_tokens
    from radfm3d.modeling.findings_prompt import build_findings_prompt_config, check_reading_options
    from radfm3d.modeling.heads import VisionPretrainingModel, read_head_file
    from radfm3d.modeling.model import RadFM3DForCausalLM

    head_file = Path(heads_dir if heads_dir is not None else model_dir) / VisionPretrainingModel.head_file
    processor = load_processor(model_dir)
    model = RadFM3DForCausalLM.from_pretrained(model_dir, load_text_weights=False)
    old = model.config.findings_prompt
    if old and not replace:
        raise RadFM3DInputError(model_dir, "the model already has a findings prompt (replace it with --replace)")
    if head_file.is_file():
        state, detector = read_head_file(head_file)
    elif old and heads_dir is None:  # replacing with the model's own heads: e.g. only a new threshold
        state, detector = dict(model.findings_prompter.state_dict()), old.get("detector")
    else:
        raise RadFM3DInputError(head_file, "no vision pre-training heads here (run the pretrain_vision stage first)")
    if old:  # same classes, phrases and slots (a custom schema stays custom); new threshold and detector
        spec = {k: v for k, v in old.items() if k != "detector"}
        num_tokens = int(old["num_tokens"]) if num_tokens is None else int(num_tokens)
        spec["threshold"] = float(old["threshold"] if threshold is None else threshold)
        if num_tokens != spec["num_tokens"]:
            raise RadFM3DInputError(model_dir, f"a replaced findings prompt keeps its {spec['num_tokens']} slots "
                                    f"(the LLM stage was trained with them), got --num-tokens {num_tokens}")
    else:
        spec = build_findings_prompt_config(processor.tokenizer, num_tokens=24 if num_tokens is None else num_tokens,
                                            threshold=0.5 if threshold is None else threshold)
    if detector:
        spec["detector"] = detector
    if site_scores is not None:
        spec["site_scores"] = str(site_scores)
    if test_time_shifts is not None:
        spec["test_time_shifts"] = test_time_shifts
    try:
        if snap_boxes is not None:
            spec.pop("box_tokens", None)
            spec.pop("snap_boxes", None)
            if snap_boxes:
                spec.update(snap_boxes=True, box_tokens=build_box_tokens(processor.tokenizer))
        shifts = check_reading_options(spec)
    except ValueError as err:
        raise RadFM3DInputError(model_dir, str(err)) from None
    spec.pop("test_time_shifts", None)
    if shifts:
        spec["test_time_shifts"] = shifts
    num_tokens, threshold = spec["num_tokens"], spec["threshold"]
    model.add_findings_prompt(spec, state, replace=replace)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.num_image_tokens = model.tokens_per_image
    processor.check_config(model.config)
    processor.save_pretrained(out)
    logger.info(f"findings prompt ({num_tokens} tokens, threshold {threshold}, site scores "
                f"{spec.get('site_scores', 'patch_map')}{f', test-time shifts {shifts}' if shifts else ''}"
                f"{', box snapping' if spec.get('snap_boxes') else ''}"
                f"{', with a finding detector' if detector else ''}) attached: {out}")
    return out


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d findings-prompt MODEL --out FOLDER``: attach the findings prompt to a vision-pre-trained model."""
    import argparse

    parser = argparse.ArgumentParser(prog="radfm3d findings-prompt", description=(
        "Give a model a findings prompt: the vision pre-training heads read each image (modality, region, findings "
        "per site) and the reading is handed to the LLM as text after the visual tokens. Train the LLM stage from "
        "the written folder."))
    parser.add_argument("model", help="model folder (e.g. models/vision_pretrained)")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--heads", default=None, help="folder with structured_head.safetensors (default: MODEL)")
    parser.add_argument("--num-tokens", type=int, default=None,
                        help="reading slots per image (default 24, or the replaced prompt's)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="minimum finding score (default 0.5, or the replaced prompt's)")
    from radfm3d.modeling.findings_prompt import SITE_SCORES

    parser.add_argument("--site-scores", default=None, choices=SITE_SCORES,
                        help="where a site's finding score comes from: the best finding-map cell inside the structure "
                             "box (patch_map, default) or the latent head's per-structure presence x type (head)")
    parser.add_argument("--test-time-shifts", default=None, metavar="'DH,DW,DD;...'",
                        help="with --site-scores head: also read the scan moved by these voxel shifts and average "
                             "the site scores, e.g. --test-time-shifts='2,2,0;-2,-2,0' ('none' removes them; "
                             "default: the replaced prompt's)")
    parser.add_argument("--snap-boxes", default=None, choices=("on", "off"),
                        help="on: generate moves the LLM's grounding boxes onto the head's finding boxes when one "
                             "overlaps most (default: the replaced prompt's, else off)")
    parser.add_argument("--replace", action="store_true",
                        help="the model already has a findings prompt: swap in these heads (same slots; LLM untouched)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    attach_findings_prompt(args.model, args.out, args.heads, args.num_tokens, args.threshold, args.replace,
                           args.site_scores, args.test_time_shifts,
                           None if args.snap_boxes is None else args.snap_boxes == "on")
    print(args.out)
    return 0
