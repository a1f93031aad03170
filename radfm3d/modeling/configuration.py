# Copyright (c) radfm3d contributors. Apache-2.0.
"""``RadFM3DConfig``: vision + resampler + text-model configs and the image-token contract."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from radfm3d.modeling.resampler import ResamplerConfig
from radfm3d.modeling.vision import VisionConfig

__all__ = ["RadFM3DConfig", "VisionTowerConfigMixin", "PRESET_DIR", "list_presets"]

#: where the shipped presets live (``radfm3d/presets/<name>.json``, package data)
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


#: preset sections read by others (the processor's ``preprocessing``), not config keys
PRESET_EXTRA_KEYS = ("preprocessing",)


def list_presets() -> list[str]:
    """Names of the shipped model presets (``tiny``, ``demo``, ...)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


class VisionTowerConfigMixin:
    """The typed views of the ``vision_config`` and ``resampler_config`` dicts that every config holding radfm3d's
    vision tower stores (the generative model's and the contrastive model's). No annotations here: the configs'
    own annotations are their keys (``own_keys``)."""

    @property
    def vision(self) -> VisionConfig:
        return VisionConfig.from_dict(self.vision_config)

    @property
    def resampler(self) -> ResamplerConfig:
        return ResamplerConfig.from_dict(self.resampler_config)


class RadFM3DConfig(VisionTowerConfigMixin, PretrainedConfig):
    """Configuration of :class:`~radfm3d.modeling.model.RadFM3DForCausalLM`.

    - ``vision_config``: dict of :class:`~radfm3d.modeling.vision.VisionConfig` fields.
    - ``resampler_config``: dict of :class:`~radfm3d.modeling.resampler.ResamplerConfig` fields
      (``dim`` defaults to the vision width, ``num_latents`` to ``num_image_tokens``).
    - ``text_config``: a transformers config of the causal LM (``model_type`` picks the class; default llama).
    - ``text_model_name_or_path``: the base LLM named, not copied (alias ``"smollm2-135m-instruct"`` or a local
      transformers folder); ``None`` = the LLM is built from ``text_config`` and saved with the checkpoint.
    - ``num_image_tokens``: visual tokens per image (= resampler latents).
    - ``base_vocab_size``: ids ``>=`` it are looked up in the model's ``extra_token_embeddings``
      (``num_extra_tokens`` rows); default: ``text_config.vocab_size``.
    - ``image_start_token_id`` / ``image_end_token_id`` / ``image_token_id`` (placeholder): default
      ``base_vocab_size + 0 / 1 / 2``.
    - ``projector_type``: ``"linear"`` (RadFM: one Linear) or ``"mlp"`` (Linear-GELU-Linear).
    """

    model_type = "radfm3d"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    vision_config: dict | None = None
    resampler_config: dict | None = None
    text_config: dict | PretrainedConfig | None = None
    text_model_name_or_path: str | None = None
    num_image_tokens: int = 32
    base_vocab_size: int | None = None
    num_extra_tokens: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    image_token_id: int | None = None
    projector_type: Literal["linear", "mlp"] = "mlp"
    projector_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        vision = VisionConfig.from_dict(self.vision_config)
        self.vision_config = vision.to_dict()
        resampler = dict(self.resampler_config or {})
        resampler.setdefault("dim", vision.hidden_size)
        resampler.setdefault("num_latents", self.num_image_tokens)
        self.resampler_config = ResamplerConfig.from_dict(resampler).to_dict()
        if self.resampler_config["num_latents"] != self.num_image_tokens:
            raise ValueError(
                f"num_image_tokens ({self.num_image_tokens}) must equal resampler num_latents "
                f"({self.resampler_config['num_latents']})"
            )
        if self.resampler_config["dim"] != vision.hidden_size:
            raise ValueError(f"resampler dim {self.resampler_config['dim']} != vision hidden {vision.hidden_size}")
        if self.base_vocab_size is None:
            self.base_vocab_size = int(self.text_config.vocab_size)
        base = self.base_vocab_size
        if self.image_start_token_id is None:
            self.image_start_token_id = base
        if self.image_end_token_id is None:
            self.image_end_token_id = base + 1
        if self.image_token_id is None:
            self.image_token_id = base + 2
        ids = (self.image_start_token_id, self.image_end_token_id, self.image_token_id)
        if len(set(ids)) != 3 or min(ids) < base:
            raise ValueError(f"image start/end/placeholder ids {ids} must be distinct and >= base_vocab_size {base}")
        if self.num_extra_tokens is None:
            self.num_extra_tokens = max(ids) - base + 1
        if max(ids) >= base + self.num_extra_tokens:
            raise ValueError(f"image ids {ids} do not fit num_extra_tokens={self.num_extra_tokens} above {base}")
        if self.projector_type not in ("linear", "mlp"):
            raise ValueError(f"projector_type must be 'linear' or 'mlp', got {self.projector_type!r}")

    def to_dict(self) -> dict[str, Any]:
        """As transformers writes it, except that a *named* base LLM's ``text_config`` does not record the folder it
        was loaded from (a per-machine cache path such as ``~/.cache/radfm3d/llm/...``): the name is the reference."""
        out = super().to_dict()
        text = out.get("text_config")
        if self.text_model_name_or_path and isinstance(text, dict) and text.get("_name_or_path"):
            text["_name_or_path"] = ""
        return out

    # ------------------------------------------------------------------ keys
    @classmethod
    def own_keys(cls) -> set[str]:
        """The keys this config class defines (its fields and those of its RadFM3D parents)."""
        keys: set[str] = set()
        for klass in cls.__mro__:
            if isinstance(klass, type) and issubclass(klass, RadFM3DConfig):
                keys.update(getattr(klass, "__annotations__", {}))
        return keys

    @classmethod
    def known_keys(cls) -> set[str]:
        """Every key a ``config.json`` of this class may hold: :meth:`own_keys` and transformers' common ones."""
        common: set[str] = set()
        for klass in PretrainedConfig.__mro__:
            common.update(getattr(klass, "__annotations__", {}))
        common.update({"_name_or_path", "model_type", "auto_map", "architectures", "transformers_version", "dtype",
                       "torch_dtype", "output_attentions", "output_hidden_states", "return_dict", "id2label",
                       "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder"})
        return {k for k in common if not k.startswith("__")} | cls.own_keys()

    # ------------------------------------------------------------------ helpers
    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens per image in the text (the visual tokens; a subclass may add slots of its own)."""
        return int(self.num_image_tokens)

    @property
    def total_vocab_size(self) -> int:
        """Base vocabulary + the model's own extra rows (what a tokenizer with the image tokens may emit)."""
        return int(self.base_vocab_size) + int(self.num_extra_tokens)

    @classmethod
    def from_preset(cls, name_or_path: str | os.PathLike, **overrides: Any) -> RadFM3DConfig:
        """Build a config from a shipped preset name (``"tiny"``, ``"demo"``), a JSON file or a folder holding
        ``config.json``. ``overrides`` replace top-level keys. A key the class does not know is a ``ValueError``
        naming it, except in a model folder's ``config.json``, of which the keys of this class are read (a subclass's
        own keys are checked by :meth:`RadFM3DForCausalLM.from_pretrained`)."""
        path = Path(name_or_path)
        candidates = [PRESET_DIR / f"{name_or_path}.json", path, path / "config.json"]
        for candidate in candidates:
            if candidate.is_file():
                data = json.loads(candidate.read_text())
                data = {k: v for k, v in data.items() if not k.startswith("_comment") and k not in PRESET_EXTRA_KEYS}
                data.update(overrides)
                unknown = sorted(set(data) - cls.known_keys())
                if candidate.name == "config.json":  # a model folder: its base part (a subclass adds its own keys)
                    data = {k: v for k, v in data.items() if k not in unknown}
                elif unknown:
                    raise ValueError(f"{candidate}: unknown config key {unknown[0]!r} for {cls.__name__}"
                                     + (f" (and {unknown[1:]})" if len(unknown) > 1 else ""))
                data.pop("model_type", None)
                return cls(**data)
        raise FileNotFoundError(
            f"{name_or_path}: not a model preset ({', '.join(list_presets())}), a JSON file or a folder with config.json"
        )
