# Copyright (c) radfm3d contributors. Apache-2.0.
"""``RadFM3DCLIPModel``: radfm3d's 3D ViT + perceiver resampler against a BERT text tower (transformers ``CLIPModel``
conventions), trained at three levels (scan, structure, study).

Parts and state-dict prefixes: ``vision_model.*`` and ``resampler.*`` (the modules and key layout of
:class:`~radfm3d.modeling.model.RadFM3DForCausalLM`, so :func:`radfm3d.contrastive.transfer.load_vision_tower` copies
them over), ``visual_projection.*`` (pooled latents -> P), ``structure_projection.*`` (pooled patch tokens -> P),
``study_fusion.*`` (series -> study), ``structure_pooling.*`` (patches -> structure; weights only for attention),
``text_model.*`` (``BertModel`` without pooler), ``text_projection.*``,
``logit_scale`` (ln of the similarity multiplier).

Image embedding: the resampler latents ``(N, hidden)`` of a volume, averaged over N, projected. Structure embedding:
the ViT patch tokens whose patch centres lie inside the structure's box (always at least the patch holding the box
centre), pooled by ``structure_pooling`` (:class:`SetPooling`: mean, max, or attention with a learned query), then
``structure_projection`` (LayerNorm + Linear). Why a projection of its own: patch tokens are
the ViT's residual stream before the resampler (no final LayerNorm in most presets) and differ in scale and
statistics from the resampler latents the scan level projects; the text side shares one projection for all levels,
so every level still lands in the one joint space. Study embedding: the present series' pooled latents fused by
``study_fusion`` (:class:`SetPooling`: attention with a learned query, initialised to zero so that it starts as the
mean; or the mean),
projected with ``visual_projection``, so a one-series study embeds exactly as that scan.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, PreTrainedModel
from transformers.utils import ModelOutput

from radfm3d.contrastive.configuration import (LEVELS, POOLING_MODES, RadFM3DCLIPConfig, clean_text_config,
                                               resolve_text_model)
from radfm3d.contrastive.loss import contrastive_loss
from radfm3d.errors import RadFM3DInputError
from radfm3d.modeling.model import check_checkpoint_state, checked_image_mask
from radfm3d.modeling.resampler import PerceiverResampler
from radfm3d.modeling.vision import VisionTransformer3D
from radfm3d.utils import atomic_write

__all__ = ["RadFM3DCLIPModel", "RadFM3DCLIPOutput", "ContrastiveLevels", "SetPooling", "box_patch_mask",
           "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# what transformers' AutoModel.from_pretrained may hand on besides the folder (hub options; 5.25 adds force_download and
# proxies): accepted and ignored, since a CLIP folder is always local
_AUTO_LOADER_KWARGS = ("config", "adapter_kwargs", "revision", "trust_remote_code", "local_files_only", "cache_dir",
                       "token", "subfolder", "_from_auto", "_commit_hash", "force_download", "proxies",
                       "code_revision", "resume_download")
#: ``exp(logit_scale)`` is clamped to this (CLIP's 100 = temperature 0.01)
MAX_LOGIT_SCALE = 100.0
# distinct token sequences whose frozen-tower encodings are kept (384 floats each for MiniLM: ~100 MB at most)
DEFAULT_TEXT_CACHE_SIZE = 65536


@dataclass
class RadFM3DCLIPOutput(ModelOutput):
    """As transformers' ``CLIPOutput``: ``loss`` (with ``return_loss``), ``logits_per_image (B, T)``,
    ``logits_per_text (T, B)`` (scaled cosine similarities), normalised ``image_embeds (B, P)`` and
    ``text_embeds (T, P)``."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


class ContrastiveLevels(dict):
    """``level -> (image_embeds (N, P), text_embeds (M, P), image_group (N,), text_group (M,))`` (normalised
    embeddings) with the model's similarity multiplier as ``.logit_scale`` (what the loss needs besides)."""

    logit_scale: torch.Tensor | None = None


class SetPooling(nn.Module):
    """A masked set of features ``(B, S, dim)`` + ``mask (B, S)`` -> one feature per row ``(B, dim)``.

    Used for the series of a study (``study_fusion``) and for the patch tokens inside a structure's box
    (``structure_pooling``). Modes:

    - ``"attention"``: softmax over the present members of ``<query, key(LayerNorm(x))> / sqrt(dim)``, weighted sum
      of the features (attention-based multiple-instance pooling, Ilse et al. 2018). The query starts at zero:
      uniform weights, i.e. the mean, so switching it on changes nothing until training moves the query.
    - ``"mean"``: mean over the present members.
    - ``"max"``: channel-wise max over the present members (keeps a strong local signal, e.g. one patch holding a
      small lesion, that a mean over a large box dilutes).
    """

    MODES = POOLING_MODES

    def __init__(self, dim: int, mode: str = "attention") -> None:
        super().__init__()
        self.mode = mode
        if mode == "attention":
            self.norm = nn.LayerNorm(dim)
            self.key = nn.Linear(dim, dim, bias=False)
            self.query = nn.Parameter(torch.zeros(dim))
        elif mode not in self.MODES:
            raise ValueError(f"pooling mode must be one of {self.MODES}, got {mode!r}")

    @staticmethod
    def _checked_mask(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(device=features.device, dtype=torch.bool)
        if mask.shape != features.shape[:2]:
            raise RadFM3DInputError("mask", f"a ({features.shape[0]}, {features.shape[1]}) mask is needed for "
                                    f"features {tuple(features.shape)}, got {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise RadFM3DInputError("mask", "a row without any present member cannot be pooled")
        return mask

    def weights(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` pooling weights of the attention and mean modes, zero on absent members, summing to 1 per row."""
        mask = self._checked_mask(features, mask)
        if self.mode == "max":
            raise ValueError("max pooling has no weights")
        if self.mode == "mean":
            scores = torch.zeros(mask.shape, dtype=features.dtype, device=features.device)
        else:
            keys = self.key(self.norm(features))
            scores = keys @ self.query.to(keys.dtype) / math.sqrt(features.shape[-1])
        return torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=1).to(features.dtype)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "max":
            mask = self._checked_mask(features, mask)
            return features.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        # a batched matrix product: no (B, S, dim) weighted copy (the structure level pools ~100 boxes x ~500 patches)
        return torch.bmm(self.weights(features, mask).unsqueeze(1), features).squeeze(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def box_patch_mask(boxes: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]
                   ) -> torch.Tensor:
    """``boxes (R, 6)`` ``[i1, j1, k1, i2, j2, k2]`` (model-grid voxel indices, half-open) -> ``(R, nh*nw*nd)`` bool in
    the ViT's ``(h w d)`` token order: patches whose centre lies inside the box, plus the patch holding the box
    centre (so a box smaller than a patch, or outside the grid, still selects one patch, the nearest)."""
    if boxes.ndim != 2 or boxes.shape[1] != 6:
        raise RadFM3DInputError("structure_boxes", f"expected (R, 6) boxes, got {tuple(boxes.shape)}")
    boxes = boxes.float()
    if not bool(torch.isfinite(boxes).all()):
        raise RadFM3DInputError("structure_boxes", "boxes hold NaN or inf values")
    axes_inside, axes_centre = [], []
    for axis, (n, p) in enumerate(zip(grid, patch_size)):
        centres = (torch.arange(n, device=boxes.device, dtype=torch.float32) + 0.5) * p  # (n,)
        lo, hi = boxes[:, axis : axis + 1], boxes[:, axis + 3 : axis + 4]
        axes_inside.append((centres >= lo) & (centres < hi))  # (R, n)
        middle = ((boxes[:, axis] + boxes[:, axis + 3]) / 2 / p).floor().long().clamp(0, n - 1)
        axes_centre.append(F.one_hot(middle, n).bool())
    inside = axes_inside[0][:, :, None, None] & axes_inside[1][:, None, :, None] & axes_inside[2][:, None, None, :]
    centre = axes_centre[0][:, :, None, None] & axes_centre[1][:, None, :, None] & axes_centre[2][:, None, None, :]
    return (inside | centre).reshape(boxes.shape[0], -1)


def _require(batch: dict[str, Any], key: str) -> Any:
    if batch.get(key) is None:
        raise RadFM3DInputError("batch", f"the contrastive batch has no {key!r} (see RadFM3DCLIPModel.encode_batch)")
    return batch[key]


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(T, L, H)`` averaged over the positions where ``mask (T, L)`` is 1 -> ``(T, H)``."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class RadFM3DCLIPModel(PreTrainedModel):
    """Contrastive 3D image-report model (see the module docstring for parts and pooling).

    ``RadFM3DCLIPModel(config)`` builds the text tower from ``config.text_config`` with random weights; use
    :meth:`from_pretrained` (a checkpoint folder, or a preset name to start from the named pretrained text tower).
    """

    config_class = RadFM3DCLIPConfig
    base_model_prefix = "radfm3d_clip"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["ViTBlock3D", "PerceiverAttention", "BertLayer"]

    def __init__(self, config: RadFM3DCLIPConfig, text_model: BertModel | None = None) -> None:
        super().__init__(config)
        hidden, dim = config.vision.hidden_size, int(config.projection_dim)
        self.vision_model = VisionTransformer3D(config.vision_config)
        self.resampler = PerceiverResampler(config.resampler_config)
        if text_model is None:
            text_model = BertModel(config.text, add_pooling_layer=False)
        self.text_model = text_model
        text_hidden = int(text_model.config.hidden_size)
        self.visual_projection = nn.Linear(hidden, dim, bias=False)
        self.structure_projection = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim, bias=False))
        self.text_projection = nn.Linear(text_hidden, dim, bias=False)
        self.study_fusion = SetPooling(hidden, config.study_fusion)
        self.structure_pooling = SetPooling(hidden, config.structure_pooling)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.text_cache_size = DEFAULT_TEXT_CACHE_SIZE
        self._text_cache: dict[Any, torch.Tensor] = {}
        self._text_cache_version: tuple[int, ...] = ()
        self.post_init()

    def train(self, mode: bool = True) -> RadFM3DCLIPModel:
        """As ``nn.Module.train``, except that a frozen text tower (no trainable weight) always runs in eval mode:
        a locked sentence encoder is used deterministically (no dropout), as in LiT, and its encodings can be cached
        (:meth:`get_text_features`)."""
        super().train(mode)
        if self._text_is_frozen():
            self.text_model.eval()
        return self

    def init_weights(self) -> None:
        """Every part initialises itself in its constructor (PyTorch defaults; BERT by its own class), and a loaded
        text tower must never be overwritten, so nothing is re-initialised here."""

    def _init_weights(self, module: nn.Module) -> None:  # pragma: no cover - see init_weights
        pass

    # ------------------------------------------------------------------ towers
    def get_logit_scale(self) -> torch.Tensor:
        """The similarity multiplier ``exp(logit_scale)`` (1 / temperature), clamped to 100."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_series(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """``(M, C, H, W, D)`` -> pooled latents ``(M, hidden)``, ViT patch tokens ``(M, nh*nw*nd, hidden)``, grid."""
        if pixel_values.ndim != 5:
            raise RadFM3DInputError("pixel_values", f"expected (M, C, H, W, D), got {tuple(pixel_values.shape)}")
        try:
            grid = self.config.vision.grid(tuple(int(s) for s in pixel_values.shape[-3:]))
        except ValueError as err:
            raise RadFM3DInputError("pixel_values", str(err)) from None
        param = self.vision_model.patch_embedding.proj.weight
        tokens = self.vision_model(pixel_values.to(device=param.device, dtype=param.dtype))
        latents = self.resampler(tokens, grid=grid)
        return latents.mean(dim=1), tokens, grid  # type: ignore[return-value]

    def _project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(pooled.to(self.visual_projection.weight.dtype))

    def get_image_features(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (not normalised) image embeddings.

        ``pixel_values (B, C, H, W, D)`` -> ``(B, P)``, one per volume; ``(B, S, C, H, W, D)`` with ``image_mask
        (B, S)`` (default all present) -> ``(B, P)``, the study embedding of each item's present series (absent
        slots are never encoded).
        """
        if pixel_values.ndim == 5:
            return self._project_image(self.encode_series(pixel_values)[0])
        if pixel_values.ndim != 6:
            raise RadFM3DInputError("pixel_values", f"expected (B, C, H, W, D) or (B, S, C, H, W, D), got "
                                    f"{tuple(pixel_values.shape)}")
        mask = checked_image_mask(pixel_values, image_mask)
        pooled = self.encode_series(pixel_values[mask])[0]
        series = pooled.new_zeros(*mask.shape, pooled.shape[-1])
        series[mask] = pooled
        return self._project_image(self.study_fusion(series, mask))

    def get_structure_features(self, pixel_values: torch.Tensor, boxes: torch.Tensor,
                               series_index: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (not normalised) region embeddings: the structure level's image side.

        ``pixel_values (M, C, H, W, D)`` (preprocessed series), ``boxes (R, 6)`` ``[i1, j1, k1, i2, j2, k2]`` in
        model-grid voxel indices, half-open (from a world-mm box:
        :func:`radfm3d.contrastive.data.grid_extent_of_world_box` with the series' grid geometry), ``series_index
        (R,)`` the series each box is on (default: all on series 0) -> ``(R, P)``: the ViT patch tokens inside each
        box pooled by ``structure_pooling``, then ``structure_projection``.
        """
        if pixel_values.ndim != 5:
            raise RadFM3DInputError("pixel_values", f"expected (M, C, H, W, D), got {tuple(pixel_values.shape)}")
        _, tokens, grid = self.encode_series(pixel_values)
        if series_index is None:
            series_index = torch.zeros(boxes.shape[0], dtype=torch.long)
        series_index = series_index.to(device=tokens.device, dtype=torch.long)
        if series_index.shape != (boxes.shape[0],):
            raise RadFM3DInputError("series_index", f"expected ({boxes.shape[0]},) indices, one per box, got "
                                    f"{tuple(series_index.shape)}")
        if bool(((series_index < 0) | (series_index >= tokens.shape[0])).any()):
            raise RadFM3DInputError("series_index", f"a box points outside the {tokens.shape[0]} given series")
        return self._structure_features(tokens, grid, series_index, boxes.to(tokens.device))

    def _structure_features(self, tokens: torch.Tensor, grid: tuple[int, int, int], rows: torch.Tensor,
                            boxes: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(M, T, hidden)`` of series ``rows (R,)``, pooled inside ``boxes (R, 6)``, projected ->
        ``(R, P)``."""
        select = box_patch_mask(boxes, grid, self.config.vision.patch_size)  # (R, T)
        regions = self.structure_pooling(tokens[rows], select)  # (R, hidden)
        head = self.structure_projection
        return head(regions.to(head[1].weight.dtype))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids (T, L)``, ``attention_mask (T, L)`` -> ``(T, P)``: BERT tokens mean-pooled over the mask,
        projected (not normalised)."""
        if input_ids.ndim != 2:
            raise RadFM3DInputError("input_ids", f"expected (T, L), got {tuple(input_ids.shape)}")
        device = self.text_projection.weight.device
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        pooled = self._pooled_text(input_ids, attention_mask)
        return self.text_projection(pooled.to(self.text_projection.weight.dtype))

    def _text_is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.text_model.parameters())

    def _text_weights_version(self) -> tuple[int, ...]:
        """Changes whenever a text-tower weight is replaced or modified in place (optimizer step, load_state_dict)."""
        return tuple(v for p in self.text_model.parameters() for v in (id(p), p._version))

    def _pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(T, L)`` -> ``(T, text_hidden)``: BERT's last hidden state mean-pooled over the mask.

        When the text tower runs deterministically (eval mode) and no gradient to it is needed, each distinct token
        sequence is encoded once and kept (up to ``text_cache_size`` entries): with a frozen tower a training run
        sees the same report sentences every epoch, and BERT is about half of an iteration's CPU time. The cache is
        dropped whenever a text weight changes (the parameters' in-place version counters), so it never serves a
        stale encoding.
        """
        cacheable = (self.text_cache_size > 0 and not self.text_model.training
                     and not (torch.is_grad_enabled() and not self._text_is_frozen()))
        if not cacheable:
            hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return _masked_mean(hidden, attention_mask)
        version = self._text_weights_version()
        if version != self._text_cache_version:
            self._text_cache.clear()
            self._text_cache_version = version
        device_type = input_ids.device.type
        autocast = (torch.is_autocast_enabled(device_type),
                    torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None)
        present = attention_mask.bool()
        host_ids, host_present = input_ids.cpu().numpy(), present.cpu().numpy()  # one transfer, not one per row
        keys = [(row[keep].tobytes(), autocast) for row, keep in zip(host_ids, host_present)]
        # one encoding per distinct missing sequence, in one batch trimmed to its longest row
        first_of: dict[Any, int] = {}
        for i, key in enumerate(keys):
            if key not in self._text_cache:
                first_of.setdefault(key, i)
        rows = list(first_of.values())
        if rows:
            length = int(present[rows].sum(dim=1).max())
            ids, mask = input_ids[rows][:, :length], attention_mask[rows][:, :length]
            with torch.no_grad():
                hidden = self.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
                pooled = _masked_mean(hidden, mask).detach()
            if len(self._text_cache) + len(rows) > self.text_cache_size:
                self._text_cache.clear()
            for row, vector in zip(rows, pooled):
                self._text_cache[keys[row]] = vector
        return torch.stack([self._text_cache[key] for key in keys]).to(input_ids.device)

    # ------------------------------------------------------------------ CLIP API
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, return_loss: bool = False,
                image_group: torch.Tensor | None = None, text_group: torch.Tensor | None = None,
                **kwargs: Any) -> RadFM3DCLIPOutput:
        """Scaled cosine logits of B images (or studies, see :meth:`get_image_features`) against T texts.

        ``return_loss``: :func:`~radfm3d.contrastive.loss.contrastive_loss` with positives where ``image_group ==
        text_group`` (default: image i <-> text i, which needs B == T). The processor's ``grid_geometry`` is
        accepted and ignored, so ``model(**processor(text=..., images=...))`` works.
        """
        kwargs.pop("grid_geometry", None)
        if kwargs:
            raise TypeError(f"RadFM3DCLIPModel.forward got unexpected arguments {sorted(kwargs)}")
        image_embeds = F.normalize(self.get_image_features(pixel_values, image_mask).float(), dim=-1)
        text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask).float(), dim=-1)
        scale = self.get_logit_scale().float()
        logits_per_text = scale * text_embeds @ image_embeds.T
        loss = None
        if return_loss:
            if image_group is None or text_group is None:
                if image_embeds.shape[0] != text_embeds.shape[0]:
                    raise RadFM3DInputError("forward", f"return_loss with {image_embeds.shape[0]} images and "
                                            f"{text_embeds.shape[0]} texts needs image_group and text_group")
                image_group = text_group = torch.arange(image_embeds.shape[0], device=image_embeds.device)
            loss = contrastive_loss(image_embeds, text_embeds, scale, image_group, text_group)
        return RadFM3DCLIPOutput(loss=loss, logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                                 image_embeds=image_embeds, text_embeds=text_embeds)

    def zero_shot_logits(self, image_embeds: torch.Tensor, present_embeds: torch.Tensor,
                         absent_embeds: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` log-odds of "present" vs "absent" per class: ``scale * (cos(image, present_k) -
        cos(image, absent_k))`` (the logit of a two-way softmax over the two prompts). Inputs are (re)normalised."""
        if present_embeds.shape != absent_embeds.shape or present_embeds.ndim != 2:
            raise RadFM3DInputError("zero_shot_logits", f"present {tuple(present_embeds.shape)} and absent "
                                    f"{tuple(absent_embeds.shape)} prompt embeddings must both be (K, P)")
        image = F.normalize(image_embeds.float(), dim=-1)
        difference = F.normalize(present_embeds.float(), dim=-1) - F.normalize(absent_embeds.float(), dim=-1)
        return self.get_logit_scale().float().to(image.device) * image @ difference.to(image.device).T

    # ------------------------------------------------------------------ training levels
    def encode_batch(self, batch: dict[str, Any], level_weights: dict[str, float] | None = None
                     ) -> ContrastiveLevels:
        """The training batch -> :class:`ContrastiveLevels` of normalised embeddings.

        Batch: ``pixel_values (B, S, C, H, W, D)``, ``image_mask (B, S)`` bool; ``report_input_ids (B, L)``,
        ``report_attention_mask (B, L)``, ``report_group (B,)``; ``structure_index (R, 2)`` [item, series],
        ``structure_boxes (R, 6)`` [i1, j1, k1, i2, j2, k2] in that series' model-grid voxel indices (half-open),
        ``structure_input_ids (R, L2)``, ``structure_attention_mask (R, L2)``, ``structure_group (R,)`` (the structure
        keys may be absent when R = 0); groups from :func:`~radfm3d.contrastive.loss.group_ids`.

        - ``scan``: every present series <-> the reports ``(B,)``; a series takes its item's report group.
        - ``study``: items with >= 2 present series, fused <-> the reports ``(B,)`` (the other items' reports are
          negatives too; those without a study have no positive and only count as negatives).
        - ``structure``: patch tokens pooled inside ``structure_boxes`` of series ``structure_index`` <-> sentences.

        A level whose weight (``level_weights``, default ``config.level_weights``) is 0 or that has no items is left
        out. Each present series goes through the ViT and the resampler once for all levels.
        """
        weights = dict(self.config.level_weights if level_weights is None else level_weights)
        pixel_values = _require(batch, "pixel_values")
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.ndim != 6:
            raise RadFM3DInputError("pixel_values", f"expected (B, S, C, H, W, D), got {tuple(pixel_values.shape)}")
        mask = checked_image_mask(pixel_values, batch.get("image_mask"))
        counts = mask.sum(dim=1)
        structure_index = batch.get("structure_index")
        n_structures = 0 if structure_index is None else int(structure_index.shape[0])
        want = {
            "scan": weights.get("scan", 0.0) > 0 and bool(mask.any()),
            "study": weights.get("study", 0.0) > 0 and bool((counts >= 2).any()),
            "structure": weights.get("structure", 0.0) > 0 and n_structures > 0,
        }
        levels = ContrastiveLevels()
        levels.logit_scale = self.get_logit_scale()
        if not any(want.values()):
            return levels
        pooled, tokens, grid = self.encode_series(pixel_values[mask])  # (M, hidden), (M, T, hidden)
        device = pooled.device
        mask = mask.to(device)
        row = torch.full(mask.shape, -1, dtype=torch.long, device=device)
        row[mask] = torch.arange(pooled.shape[0], device=device)
        if want["scan"] or want["study"]:
            reports = F.normalize(self.get_text_features(_require(batch, "report_input_ids"),
                                                         batch.get("report_attention_mask")).float(), dim=-1)
            report_group = _require(batch, "report_group").to(device)
            if report_group.shape != (mask.shape[0],):
                raise RadFM3DInputError("report_group", f"expected ({mask.shape[0]},) ids, one per item, got "
                                        f"{tuple(report_group.shape)}")
        if want["scan"]:
            item = mask.nonzero()[:, 0]
            images = F.normalize(self._project_image(pooled).float(), dim=-1)
            levels["scan"] = (images, reports, report_group[item], report_group)
        if want["study"]:
            multi = counts.to(device) >= 2
            series = pooled.new_zeros(*mask.shape, pooled.shape[-1])
            series[mask] = pooled
            fused = self.study_fusion(series[multi], mask[multi])
            images = F.normalize(self._project_image(fused).float(), dim=-1)
            levels["study"] = (images, reports, report_group[multi], report_group)
        if want["structure"]:
            index = structure_index.to(device=device, dtype=torch.long)
            if index.ndim != 2 or index.shape[1] != 2:
                raise RadFM3DInputError("structure_index", f"expected (R, 2) [item, series], got {tuple(index.shape)}")
            b, s = mask.shape
            if bool(((index[:, 0] < 0) | (index[:, 0] >= b) | (index[:, 1] < 0) | (index[:, 1] >= s)).any()):
                raise RadFM3DInputError("structure_index", f"an [item, series] index lies outside (B, S)=({b}, {s})")
            rows = row[index[:, 0], index[:, 1]]
            if bool((rows < 0).any()):
                raise RadFM3DInputError("structure_index", "a structure points at an absent series (image_mask)")
            boxes = _require(batch, "structure_boxes").to(device)
            if boxes.shape[0] != index.shape[0]:
                raise RadFM3DInputError("structure_boxes", f"{boxes.shape[0]} boxes for {index.shape[0]} structures")
            images = F.normalize(self._structure_features(tokens, grid, rows, boxes).float(), dim=-1)
            sentences = F.normalize(self.get_text_features(_require(batch, "structure_input_ids"),
                                                           batch.get("structure_attention_mask")).float(), dim=-1)
            group = _require(batch, "structure_group").to(device)
            levels["structure"] = (images, sentences, group, group)
        ordered = ContrastiveLevels({k: levels[k] for k in LEVELS if k in levels})
        ordered.logit_scale = levels.logit_scale
        return ordered

    # ------------------------------------------------------------------ training switches
    def freeze(self, vision: bool | None = None, resampler: bool | None = None, text: bool | None = None
               ) -> dict[str, int]:
        """Freeze (True) / unfreeze (False) the ViT, the resampler, the BERT tower; None leaves a part as it is.
        Projections, fusion and the logit scale stay trainable. Returns the trainable parameter count per part."""
        parts = {"vision": (self.vision_model, vision), "resampler": (self.resampler, resampler),
                 "text": (self.text_model, text)}
        for module, flag in parts.values():
            if flag is not None:
                module.requires_grad_(not flag)
        if text is not None:
            self.text_model.train(self.training and not text)
        return {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in parts.items()}

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing for the ViT blocks, the resampler layers and the BERT layers."""
        self.vision_model.set_gradient_checkpointing(enable)
        self.resampler.set_gradient_checkpointing(enable)
        if enable:
            self.text_model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.text_model.activation_checkpointing_disable()

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> list[Path]:  # type: ignore[override]
        """Write ``config.json`` and ``model.safetensors`` (every weight: vision, text, heads) atomically, keeping
        the other files of the folder (the processor's tokenizer files and ``preprocessing.json``)."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        written = [folder / WEIGHTS_NAME, folder / CONFIG_NAME]
        atomic_write(written[0], lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        config.pop("dtype", None)
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        atomic_write(written[1], lambda tmp: Path(tmp).write_text(text))
        return written

    @classmethod
    def _read_config(cls, folder: Path) -> RadFM3DCLIPConfig:
        """``folder/config.json`` -> the config; an unknown key or another model type is a
        :class:`~radfm3d.errors.RadFM3DInputError` naming it."""
        path = folder / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RadFM3DInputError(path, f"not JSON ({err.msg})") from None
        if not isinstance(data, dict):
            raise RadFM3DInputError(path, "not a JSON object")
        model_type = data.pop("model_type", RadFM3DCLIPConfig.model_type)
        if model_type != RadFM3DCLIPConfig.model_type:
            raise RadFM3DInputError(path, f"model_type {model_type!r} is not a {RadFM3DCLIPConfig.model_type!r} "
                                    f"checkpoint")
        unknown = sorted(set(data) - RadFM3DCLIPConfig.known_keys())
        if unknown:
            raise RadFM3DInputError(path, f"unknown config key {unknown[0]!r}" + (
                f" (and {unknown[1:]})" if len(unknown) > 1 else "") + " for RadFM3DCLIPConfig; known keys: "
                + ", ".join(sorted(RadFM3DCLIPConfig.own_keys())))
        if data.get("text_config") is None:
            raise RadFM3DInputError(path, "no text_config (a checkpoint stores its text tower's config)")
        try:
            return RadFM3DCLIPConfig(**data)
        except (TypeError, ValueError) as err:
            raise RadFM3DInputError(path, str(err)) from None

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        load_text_weights: bool = True,
        **config_overrides: Any,
    ) -> RadFM3DCLIPModel:
        """Load a checkpoint folder, or start a model from a radfm3d preset name (``"tiny"``, ``"demo"``).

        Folder: ``config.json`` (every key known, else an error naming it) and ``model.safetensors`` holding every
        weight, loaded strictly (missing or unexpected keys raise) and checked finite; nothing else is read.
        Preset: vision and resampler from the preset (random), the text tower loaded from
        ``text_model_name_or_path`` (offline), or, with ``load_text_weights=False``, built from ``text_config``
        with random weights (tests, tiny models). ``config_overrides`` set config keys (presets only).
        ``AutoModel.from_pretrained(folder)`` works too (model type ``radfm3d_clip`` is registered).
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # what transformers' AutoModel.from_pretrained hands on (its config is read from the same config.json,
        # which is read here again, strictly)
        for key in _AUTO_LOADER_KWARGS:
            config_overrides.pop(key, None)
        source = Path(pretrained_model_name_or_path)
        if (source / CONFIG_NAME).is_file():
            if config_overrides:
                raise TypeError(f"config overrides {sorted(config_overrides)} apply to presets, not checkpoints")
            model = cls(cls._read_config(source))
            model._load_checkpoint_state(source)
            return model._loaded(dtype)
        return cls.from_preset(pretrained_model_name_or_path, dtype=dtype, load_text_weights=load_text_weights,
                               **config_overrides)

    @classmethod
    def from_preset(cls, name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    load_text_weights: bool = True, **config_overrides: Any) -> RadFM3DCLIPModel:
        """A fresh model (eval mode) shaped by a radfm3d preset (``"tiny"``, ``"demo"``, a preset JSON file) or by a
        generative-model folder (:meth:`RadFM3DCLIPConfig.from_preset`): vision tower, resampler and projections
        random, the text tower loaded from ``text_model_name_or_path`` (offline), or, with
        ``load_text_weights=False``, built from ``text_config`` with random weights (tests, tiny models)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        config = RadFM3DCLIPConfig.from_preset(name_or_path, **config_overrides)
        text_model = None
        if load_text_weights:
            if not config.text_model_name_or_path:
                raise ValueError("load_text_weights needs text_model_name_or_path (or pass load_text_weights="
                                 "False to build the text tower from text_config)")
            text_model = load_text_tower(config.text_model_name_or_path)
            config.text_config = clean_text_config(text_model.config.to_dict())
        return cls(config, text_model=text_model)._loaded(dtype)

    def _loaded(self, dtype: torch.dtype | str | None) -> RadFM3DCLIPModel:
        """The end of both loaders: cast to ``dtype`` (a ``torch.dtype`` or its name; None / "auto" keep float32),
        eval mode."""
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype):
            self.to(dtype=dtype)
        return self.eval()

    def _load_checkpoint_state(self, folder: Path) -> None:
        from safetensors import SafetensorError, safe_open

        path = folder / WEIGHTS_NAME
        if not path.is_file():
            raise RadFM3DInputError(folder, f"no {WEIGHTS_NAME} in the checkpoint folder")
        loaded: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    loaded[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise RadFM3DInputError(path, f"unreadable safetensors file ({err})") from None
        expected = set(self.state_dict())
        check_checkpoint_state(path, {}, sorted(expected - set(loaded)), sorted(set(loaded) - expected))
        own = self.state_dict()
        for name, tensor in loaded.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise RadFM3DInputError(path, f"tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                                        f"{tuple(own[name].shape)} (config.json does not match the weights)")
        check_checkpoint_state(path, loaded)
        self.load_state_dict(loaded, strict=True)


def load_text_tower(name_or_path: str | os.PathLike) -> BertModel:
    """The pretrained ``BertModel`` (no pooler) of a text-tower alias or local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = resolve_text_model(name_or_path)
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are reported otherwise
    hf_logging.disable_progress_bar()  # a per-tensor bar for a 100-tensor file
    try:
        model = BertModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise RadFM3DInputError(folder, f"cannot load the text tower as a BERT model ({err})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model


def _register_auto_classes() -> None:
    """Let ``AutoConfig``/``AutoModel`` resolve ``model_type="radfm3d_clip"``."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(RadFM3DCLIPConfig.model_type, RadFM3DCLIPConfig)
        AutoModel.register(RadFM3DCLIPConfig, RadFM3DCLIPModel)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()
