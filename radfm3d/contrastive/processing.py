# Copyright (c) radfm3d contributors. Apache-2.0.
"""``RadFM3DCLIPProcessor``: the text tower's tokenizer + a :class:`~radfm3d.transforms.PreprocessingRecipe` ->
inputs of :class:`~radfm3d.contrastive.model.RadFM3DCLIPModel`::

    processor = RadFM3DCLIPProcessor.from_pretrained("path/to/clip_model")
    enc = processor(text=["No abnormality.", "Nodule in the right lung."], images=["a.nii.gz", "b.nii.gz"])
    # input_ids (T, L), attention_mask (T, L), pixel_values (B, C, H, W, D), grid_geometry (B lists of dicts)
    out = model(**{k: v for k, v in enc.items() if k != "grid_geometry"})

``images`` entries that are lists (the series of one study) give ``pixel_values (B, S, C, H, W, D)`` and
``image_mask (B, S)`` instead. Images are read and preprocessed by the same code as the generative model's
processor (:func:`radfm3d.io.load_image`, :func:`radfm3d.transforms.preprocess`,
:meth:`radfm3d.processing.RadFM3DProcessor.stack_images`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature

from radfm3d.errors import RadFM3DInputError
from radfm3d.processing import RadFM3DProcessor, save_processor_files
from radfm3d.transforms import PreprocessingRecipe
from radfm3d.utils import read_json_object

__all__ = ["RadFM3DCLIPProcessor", "CLIP_PROCESSOR_CONFIG_NAME"]

CLIP_PROCESSOR_CONFIG_NAME = "processor_config.json"
_FORMAT = "radfm3d-clip-processor"


def _is_image(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike, np.ndarray, torch.Tensor))


class RadFM3DCLIPProcessor:
    """Tokenizer (the text tower's, e.g. MiniLM's WordPiece) + preprocessing recipe.

    ``__call__(text=None, images=None, modalities=None)`` -> ``BatchFeature`` with ``input_ids``,
    ``attention_mask`` (texts padded right, truncated to ``max_text_length``) and ``pixel_values`` (float32, [0, 1])
    (+ ``image_mask`` for study lists) and ``grid_geometry``.
    """

    def __init__(self, tokenizer: Any, recipe: PreprocessingRecipe | None = None, max_text_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.recipe = recipe if recipe is not None else PreprocessingRecipe()
        self.max_text_length = int(max_text_length)

    # ------------------------------------------------------------------ images
    # the generative processor's check of an already preprocessed (C, *grid) tensor against self.recipe
    _check_preprocessed = RadFM3DProcessor._check_preprocessed
    stack_images = staticmethod(RadFM3DProcessor.stack_images)

    def preprocess_image(self, image: Any, modality: str | None = None, images_are_preprocessed: bool = False
                         ) -> tuple[torch.Tensor, dict]:
        """One image (path, DICOM folder, ``MetaTensor``, array) -> ``((C, H, W, D) float32, GridGeometry dict)``;
        ``modality`` (``"CT"``, ``"MR"``, ...) overrides the one read from the file for the intensity scaling."""
        if images_are_preprocessed:
            # the generative processor's path for (C, *grid) tensors, which reads only self.recipe
            return RadFM3DProcessor.preprocess_image(self, image, True)  # type: ignore[arg-type]
        from monai.data import MetaTensor

        from radfm3d.io import load_image
        from radfm3d.transforms import preprocess

        if not isinstance(image, MetaTensor):
            if not _is_image(image):
                raise RadFM3DInputError(f"<{type(image).__name__}>", "an image is a path, a MetaTensor or an array")
            image = load_image(image)
        out = preprocess(image, self.recipe, modality=modality)
        return out.as_tensor().detach().to(dtype=torch.float32, device="cpu"), dict(out.meta["grid_geometry"])

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Texts -> ``input_ids (T, L)``, ``attention_mask (T, L)`` (right padding, truncation)."""
        if isinstance(texts, str):
            texts = [texts]
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise RadFM3DInputError("text", f"text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length or self.max_text_length,
                             return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # ------------------------------------------------------------------ __call__
    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, *, modalities: Any = None,
                 max_length: int | None = None, images_are_preprocessed: bool = False) -> BatchFeature:
        if text is None and images is None:
            raise RadFM3DInputError("processor", "give text, images or both")
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self.tokenize([text] if isinstance(text, str) else list(text), max_length))
        if images is not None:
            entries = [images] if _is_image(images) else list(images)
            studies = any(isinstance(e, (list, tuple)) for e in entries)
            per_item = [list(e) if isinstance(e, (list, tuple)) else [e] for e in entries]
            if modalities is None:
                per_modality: list[list[Any]] = [[None] * len(item) for item in per_item]
            else:
                mods = [modalities] if isinstance(modalities, str) else list(modalities)
                per_modality = [list(m) if isinstance(m, (list, tuple)) else [m] for m in mods]
                if [len(m) for m in per_modality] != [len(i) for i in per_item]:
                    raise RadFM3DInputError("modalities", "give one modality per image, in the layout of images")
            tensors, geometries = [], []
            for item, mods in zip(per_item, per_modality):
                pairs = [self.preprocess_image(img, mod, images_are_preprocessed) for img, mod in zip(item, mods)]
                tensors.append([p[0] for p in pairs])
                geometries.append([p[1] for p in pairs])
            pixel_values, image_mask = self.stack_images(tensors)
            if studies:
                data["pixel_values"], data["image_mask"] = pixel_values, image_mask
            else:
                data["pixel_values"] = pixel_values[:, 0]
            data["grid_geometry"] = geometries
        return BatchFeature(data, tensor_type=None, skip_tensor_conversion={"grid_geometry"})

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """What ``processor_config.json`` holds (the recipe goes to ``preprocessing.json``)."""
        return {"format": _FORMAT, "version": 1, "processor_class": type(self).__name__,
                "max_text_length": self.max_text_length}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the tokenizer files, ``preprocessing.json`` and ``processor_config.json`` (last), each atomically
        (staged in a temporary folder inside ``save_directory``, then moved into place with ``os.replace``)."""
        return save_processor_files(save_directory, self.tokenizer, self.recipe, self.to_dict(),
                                    CLIP_PROCESSOR_CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> RadFM3DCLIPProcessor:
        """A folder saved by :meth:`save_pretrained`; else a CLIP model folder or a preset name, whose text tower
        (``text_model_name_or_path``, default MiniLM) gives the tokenizer and whose ``preprocessing.json`` (folder)
        or ``"preprocessing"`` entry (preset) the recipe. ``overrides``: ``recipe``, ``max_text_length``,
        ``text_model_name_or_path`` (presets)."""
        from transformers import AutoTokenizer, PretrainedConfig

        path = Path(name_or_path)
        config_file = path / CLIP_PROCESSOR_CONFIG_NAME
        if config_file.is_file():
            data = read_json_object(config_file)
            if data.get("format") != _FORMAT:
                raise RadFM3DInputError(config_file, f"not a radfm3d CLIP processor config (format "
                                        f"{data.get('format')!r})")
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=PretrainedConfig())
            recipe = overrides.pop("recipe", None) or PreprocessingRecipe.load(path)
            kwargs = {"max_text_length": data.get("max_text_length", 128), **overrides}
            return cls(tokenizer, recipe, **kwargs)
        return cls.from_model_config(name_or_path, **overrides)

    @classmethod
    def from_model_config(cls, name_or_path: str | os.PathLike, recipe: PreprocessingRecipe | None = None,
                          text_model_name_or_path: str | None = None, max_text_length: int | None = None
                          ) -> RadFM3DCLIPProcessor:
        """Processor for a CLIP model folder (its ``config.json``), a generative model folder (its preprocessing, the
        MiniLM tokenizer) or a radfm3d preset name (MiniLM tokenizer)."""
        from transformers import AutoTokenizer

        from radfm3d.contrastive.configuration import is_clip_folder, resolve_text_model
        from radfm3d.modeling.configuration import PRESET_DIR

        path = Path(name_or_path)
        config: dict[str, Any] = {}  # a CLIP folder's text tower and text length (a generative folder's name its LLM)
        if (path / "config.json").is_file():
            if is_clip_folder(path):
                config = read_json_object(path / "config.json")
            if recipe is None and (path / "preprocessing.json").is_file():
                recipe = PreprocessingRecipe.load(path)
        elif (PRESET_DIR / f"{name_or_path}.json").is_file():
            preset = read_json_object(PRESET_DIR / f"{name_or_path}.json")
            if recipe is None and preset.get("preprocessing"):
                recipe = PreprocessingRecipe.from_dict(preset["preprocessing"])
        else:
            raise RadFM3DInputError(path, "not a CLIP processor folder, a model folder or a preset name")
        text_source = text_model_name_or_path or config.get("text_model_name_or_path") or "all-minilm-l6-v2"
        tokenizer = AutoTokenizer.from_pretrained(str(resolve_text_model(text_source)), local_files_only=True)
        return cls(tokenizer, recipe, int(max_text_length or config.get("max_text_length") or 128))
