# Copyright (c) radfm3d contributors. Apache-2.0.
"""``RadFM3DProcessor``: tokenizer (with the image tokens) + preprocessing recipe -> model inputs.

Text carries one ``<image>`` placeholder per image; the processor expands each to
``<|image_start|> + N x <|image_pad|> + <|image_end|>`` (N = ``num_image_tokens``, the resampler latents), reads
and preprocesses the images with the recipe saved beside the model, and returns what
``RadFM3DForCausalLM.forward/generate`` takes::

    processor = RadFM3DProcessor.from_pretrained("path/to/model")
    enc = processor(text=["[vqa] <image> Is there a nodule?"], images=[["scan.nii.gz"]])
    # enc: input_ids (B, L), attention_mask (B, L), pixel_values (B, S, C, H, W, D) float32,
    #      image_mask (B, S) bool, grid_geometry (B lists of per-image GridGeometry dicts)
    inputs = {k: v for k, v in enc.items() if k != "grid_geometry"}
    out = model.generate(**inputs, max_new_tokens=64)
    answers = processor.batch_decode(out[:, enc["input_ids"].shape[1]:])

Token contract (see ``RadFM3DConfig``): the three image tokens are added to the tokenizer as special tokens in
the order start, end, pad, so for a tokenizer whose length equals the LLM's vocabulary their ids are
``base_vocab_size + 0 / 1 / 2`` (the config's defaults); :meth:`RadFM3DProcessor.config_token_kwargs` gives the
exact ids to build a config from the processor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature

from radfm3d.errors import RadFM3DInputError
from radfm3d.text.checks import check_context_length, check_text
from radfm3d.text.prompts import IMAGE_PLACEHOLDER, format_chat, split_task
from radfm3d.transforms import PreprocessingRecipe
from radfm3d.utils import read_json_object

__all__ = [
    "RadFM3DProcessor",
    "save_processor_files",
    "IMAGE_START_TOKEN",
    "IMAGE_END_TOKEN",
    "IMAGE_PAD_TOKEN",
    "PROCESSOR_CONFIG_NAME",
    "IGNORE_INDEX",
    "build_char_tokenizer",
    "check_text",
    "check_context_length",
]

IMAGE_START_TOKEN = "<|image_start|>"
IMAGE_END_TOKEN = "<|image_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"  # the placeholder the model fills with visual tokens (config.image_token_id)
PROCESSOR_CONFIG_NAME = "processor_config.json"
IGNORE_INDEX = -100
_FORMAT = "radfm3d-processor"
_NON_TENSOR_KEYS = {"grid_geometry"}


# ------------------------------------------------------------------------------------------------ tokenizer
def build_char_tokenizer(vocab_size: int = 128) -> Any:
    """A character-level fast tokenizer with no hub access (tiny preset, tests).

    Ids: ``<pad>`` 0, ``<s>`` 1 (BOS, prepended to every encoding), ``</s>`` 2 (EOS), ``<unk>`` 3, then
    newline and the 95 printable ASCII characters, then ``<|unused_k|>`` fillers up to ``vocab_size`` (>= 100), so
    tokens added later (the image tokens) get ids ``vocab_size, vocab_size + 1, ...``.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    if vocab_size < len(specials) + len(chars):
        raise ValueError(f"vocab_size must be >= {len(specials) + len(chars)}, got {vocab_size}")
    fillers = [f"<|unused_{k}|>" for k in range(vocab_size - len(specials) - len(chars))]
    vocab = {tok: i for i, tok in enumerate(specials + chars + fillers)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def _load_base_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer of a base LLM (alias, local folder or .gguf) via :mod:`radfm3d.modeling.llm`, no network."""
    from transformers import AutoTokenizer

    from radfm3d.modeling import llm

    loader = getattr(llm, "load_base_tokenizer", None)
    if loader is not None:
        return loader(name_or_path)
    source = llm.resolve_base_llm(name_or_path)
    folder = source
    if source.suffix == ".gguf":
        cache_dir = getattr(llm, "_gguf_cache_dir", None)
        name = str(name_or_path) if llm.is_alias(name_or_path) else source.stem
        folder = cache_dir(source, name) if cache_dir is not None else None
        if folder is None or not (folder / "config.json").is_file():
            _, tokenizer = llm.load_base_llm(name_or_path)  # converts and caches the GGUF once
            if tokenizer is None:
                raise RadFM3DInputError(name_or_path, "the base LLM has no tokenizer")
            return tokenizer
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _is_single_image(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike, np.ndarray, torch.Tensor))


# ------------------------------------------------------------------------------------------------ processor
def save_processor_files(save_directory: str | os.PathLike, tokenizer: Any, recipe: PreprocessingRecipe,
                         config: dict[str, Any], config_name: str) -> Path:
    """Write a processor's tokenizer files, ``preprocessing.json`` and its ``config_name`` JSON into a folder.

    Every file is written atomically: all of them go to a temporary folder inside ``save_directory`` first and are
    then moved into place one by one with ``os.replace`` (the config last), so a kill leaves each file either old
    or new, never half written."""
    import shutil
    import tempfile

    from radfm3d.utils import atomic_write

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".processor-", dir=out))
    try:
        tokenizer.save_pretrained(str(staging))
        recipe.save(staging)
        for item in sorted(staging.iterdir()):
            if item.is_file():
                os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(out / config_name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


class RadFM3DProcessor:
    """Tokenizer + :class:`~radfm3d.transforms.PreprocessingRecipe` -> ``input_ids``, ``attention_mask``,
    ``pixel_values (B, S, C, H, W, D)``, ``image_mask (B, S)``, ``grid_geometry``.

    Args:
        tokenizer: a transformers (fast) tokenizer; the three image tokens are added if missing, a missing pad
            token is set to the EOS token.
        recipe: preprocessing recipe (default ``PreprocessingRecipe()``).
        num_image_tokens: N placeholders per image (= the model's ``tokens_per_image``: resampler latents plus any
            findings-prompt slots).
        image_start_token / image_end_token / image_pad_token: the special token strings.
        image_placeholder: what users write in text for an image (``"<image>"``).
        use_chat_template: wrap every prompt with :func:`radfm3d.text.prompts.format_chat` (the tokenizer's chat
            template, or a ``User:/Assistant:`` layout) in ``__call__`` and ``build_training_example`` alike.
    """

    def __init__(
        self,
        tokenizer: Any,
        recipe: PreprocessingRecipe | None = None,
        num_image_tokens: int = 32,
        *,
        image_start_token: str = IMAGE_START_TOKEN,
        image_end_token: str = IMAGE_END_TOKEN,
        image_pad_token: str = IMAGE_PAD_TOKEN,
        image_placeholder: str = IMAGE_PLACEHOLDER,
        use_chat_template: bool = False,
    ) -> None:
        if int(num_image_tokens) < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        tokens = (image_start_token, image_end_token, image_pad_token)
        if len(set(tokens)) != 3 or image_placeholder in tokens:
            raise ValueError(f"image tokens {tokens} must be distinct and differ from the placeholder")
        self.tokenizer = tokenizer
        self.recipe = recipe if recipe is not None else PreprocessingRecipe()
        self.num_image_tokens = int(num_image_tokens)
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.image_pad_token = image_pad_token
        self.image_placeholder = image_placeholder
        self.use_chat_template = bool(use_chat_template)
        self._add_image_tokens()
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ tokens
    def _add_image_tokens(self) -> None:
        from tokenizers import AddedToken

        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (self.image_start_token, self.image_end_token, self.image_pad_token) if t not in vocab]
        if missing:  # order start, end, pad -> base + 0 / 1 / 2 (RadFM3DConfig defaults)
            self.tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                                      special_tokens=True)
        ids = self.tokenizer.convert_tokens_to_ids(
            [self.image_start_token, self.image_end_token, self.image_pad_token])
        self.image_start_token_id, self.image_end_token_id, self.image_token_id = (int(i) for i in ids)

    @property
    def image_token_ids(self) -> dict[str, int]:
        """``{"image_start_token_id", "image_end_token_id", "image_token_id"}`` (the RadFM3DConfig field names)."""
        return {"image_start_token_id": self.image_start_token_id, "image_end_token_id": self.image_end_token_id,
                "image_token_id": self.image_token_id}

    def config_token_kwargs(self, base_vocab_size: int | None = None) -> dict[str, int]:
        """Keyword arguments for ``RadFM3DConfig`` matching this processor: the image-token ids,
        ``num_image_tokens``, ``base_vocab_size`` (default: the lowest image-token id, i.e. the tokenizer's
        length before the tokens were added) and ``num_extra_tokens``."""
        ids = list(self.image_token_ids.values())
        base = min(ids) if base_vocab_size is None else int(base_vocab_size)
        if min(ids) < base:
            raise ValueError(f"image-token ids {ids} lie inside the base vocabulary (< {base})")
        return {**self.image_token_ids, "num_image_tokens": self.num_image_tokens, "base_vocab_size": base,
                "num_extra_tokens": max(ids) - base + 1}

    def check_config(self, config: Any) -> None:
        """Raise ``ValueError`` unless ``config`` (a ``RadFM3DConfig``) uses this processor's token ids and N."""
        mine = {**self.image_token_ids, "num_image_tokens": self.num_image_tokens}
        theirs = {k: getattr(config, k, None) for k in mine}
        # placeholders per image: the visual tokens plus a findings prompt's slots
        theirs["num_image_tokens"] = getattr(config, "tokens_per_image", theirs["num_image_tokens"])
        if {k: int(v) if v is not None else None for k, v in theirs.items()} != mine:
            raise ValueError(f"processor and model config disagree on the image tokens: processor {mine}, "
                             f"config {theirs}; build the config with processor.config_token_kwargs()")

    @property
    def _reserved(self) -> tuple[str, str, str]:
        return (self.image_start_token, self.image_end_token, self.image_pad_token)

    @property
    def _image_block(self) -> str:
        return self.image_start_token + self.image_pad_token * self.num_image_tokens + self.image_end_token

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    # ------------------------------------------------------------------ text
    def _prepare_text(self, text: str, n_images: int, index: int, chat: bool | None) -> str:
        """Check reserved tokens and placeholder count (prepending placeholders when none are written), then
        apply the chat format when asked."""
        text = check_text(text, f"text[{index}]")
        for token in self._reserved:
            if token in text:
                raise RadFM3DInputError(f"text[{index}]", f"contains the reserved token {token!r}; write "
                                        f"{self.image_placeholder!r} where an image goes instead")
        n_written = text.count(self.image_placeholder)
        if n_written == 0 and n_images > 0:
            task, rest = split_task(text)
            images = " ".join([self.image_placeholder] * n_images)
            text = f"[{task}] {images} {rest}" if task is not None else f"{images} {text}"
        elif n_written != n_images:
            raise RadFM3DInputError(f"text[{index}]", f"{n_written} {self.image_placeholder} placeholder(s) but "
                                    f"{n_images} image(s) given; give one image per placeholder")
        if self.use_chat_template if chat is None else chat:
            text = format_chat(self.tokenizer, text)
        return text

    def _encode_prompt(self, text: str, n_images: int, index: int, chat: bool | None,
                       add_special_tokens: bool = True) -> tuple[list[int], str]:
        """Prompt -> token ids with every placeholder expanded; also returns the prepared text."""
        prepared = self._prepare_text(text, n_images, index, chat)
        expanded = prepared.replace(self.image_placeholder, self._image_block)
        ids = list(self.tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"])
        n_pad = sum(1 for i in ids if i == self.image_token_id)
        n_start = sum(1 for i in ids if i == self.image_start_token_id)
        if n_pad != n_images * self.num_image_tokens or n_start != n_images:
            raise RadFM3DInputError(f"text[{index}]", f"the tokenizer did not keep the image tokens intact "
                                    f"({n_start} starts / {n_pad} pads for {n_images} image(s))")
        return ids, prepared

    def _truncate(self, ids: list[int], max_length: int, index: int) -> list[int]:
        if len(ids) <= max_length:
            return ids
        side = getattr(self.tokenizer, "truncation_side", "right")
        kept = ids[len(ids) - max_length:] if side == "left" else ids[:max_length]
        image_ids = {self.image_start_token_id, self.image_end_token_id, self.image_token_id}
        if sum(i in image_ids for i in kept) != sum(i in image_ids for i in ids):
            raise RadFM3DInputError(f"text[{index}]", f"truncating {len(ids)} tokens to max_length={max_length} "
                                    "would cut into an image's tokens; raise max_length or shorten the text")
        return kept

    # ------------------------------------------------------------------ images
    def _check_preprocessed(self, tensor: torch.Tensor, source: str) -> None:
        r = self.recipe
        if tensor.ndim != 4 or tensor.shape[0] != r.num_channels:
            raise RadFM3DInputError(source, f"a preprocessed image is ({r.num_channels}, H, W, D), got "
                                    f"{tuple(tensor.shape)}")
        grids = {tuple(r.spatial_size)} | ({tuple(r.spatial_size_2d)} if r.spatial_size_2d else set())
        shape = tuple(int(s) for s in tensor.shape[1:])
        depth_ok = r.depth_multiple is not None and any(
            shape[:2] == g[:2] and shape[2] <= g[2] and shape[2] % r.depth_multiple == 0 for g in grids)
        if shape not in grids and not depth_ok:
            raise RadFM3DInputError(source, f"preprocessed image grid {shape} does not match the recipe's "
                                    f"{sorted(grids)}; pass the raw image instead")

    def preprocess_image(self, image: Any, images_are_preprocessed: bool = False) -> tuple[torch.Tensor, dict]:
        """One image -> ``((C, H, W, D) float32, GridGeometry dict)``.

        ``image``: a path (file or DICOM folder), a ``MetaTensor`` from :func:`radfm3d.io.load_image`, or an array
        (read with ``load_image``, identity affine). With ``images_are_preprocessed`` a ``(C, *grid)`` tensor is
        used as is (its ``meta["grid_geometry"]`` is kept when present).
        """
        from monai.data import MetaTensor

        from radfm3d.transforms import GridGeometry, preprocess

        source = str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>"
        if images_are_preprocessed:
            tensor = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image)
            self._check_preprocessed(tensor, source)
            geometry = image.meta.get("grid_geometry") if isinstance(image, MetaTensor) else None
            if geometry is None:
                affine = (np.asarray(image.affine, dtype=np.float64) if isinstance(image, MetaTensor)
                          else np.eye(4))
                shape = tuple(int(s) for s in tensor.shape[1:])
                geometry = GridGeometry(affine, affine, shape, shape).to_dict()
            return tensor.detach().to(dtype=torch.float32, device="cpu"), dict(geometry)
        if not isinstance(image, MetaTensor):
            if not _is_single_image(image):
                raise RadFM3DInputError(source, "an image is a path, a MetaTensor or an array")
            from radfm3d.io import load_image

            image = load_image(image)
        out = preprocess(image, self.recipe)
        return out.as_tensor().detach().to(dtype=torch.float32, device="cpu"), dict(out.meta["grid_geometry"])

    @staticmethod
    def stack_images(per_sample: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample lists of ``(C, H, W, D)`` -> ``pixel_values (B, S, C, H, W, D)`` zero-padded over S (and over
        H, W, D at the high end when grids differ, e.g. 2D vs 3D recipes) and ``image_mask (B, S)`` bool."""
        images = [img for sample in per_sample for img in sample]
        batch, slots = len(per_sample), max((len(s) for s in per_sample), default=0)
        if not images:
            return torch.zeros((batch, 0, 0, 0, 0, 0)), torch.zeros((batch, 0), dtype=torch.bool)
        channels = {int(img.shape[0]) for img in images}
        if len(channels) != 1:
            raise RadFM3DInputError("images", f"images with different channel counts {sorted(channels)} in one batch")
        spatial = [max(int(img.shape[1 + a]) for img in images) for a in range(3)]
        pixel_values = torch.zeros((batch, slots, channels.pop(), *spatial), dtype=torch.float32)
        image_mask = torch.zeros((batch, slots), dtype=torch.bool)
        for b, sample in enumerate(per_sample):
            for s, img in enumerate(sample):
                pixel_values[b, s, :, : img.shape[1], : img.shape[2], : img.shape[3]] = img
                image_mask[b, s] = True
        return pixel_values, image_mask

    def _normalise_images(self, images: Any, batch: int, single: bool) -> list[list[Any]]:
        if images is None:
            return [[] for _ in range(batch)]
        if single:
            if _is_single_image(images):
                return [[images]]
            return [list(images)]
        if _is_single_image(images) or len(images) != batch:
            raise RadFM3DInputError("images", f"give one entry per text (None, an image or a list of images): "
                                    f"{batch} texts but {1 if _is_single_image(images) else len(images)} entries")
        return [[] if entry is None else [entry] if _is_single_image(entry) else list(entry) for entry in images]

    def _load_images(self, per_sample: list[list[Any]], preprocessed: bool) -> tuple[list[list[torch.Tensor]],
                                                                                     list[list[dict]]]:
        tensors, geometries = [], []
        for sample in per_sample:
            pairs = [self.preprocess_image(img, preprocessed) for img in sample]
            tensors.append([p[0] for p in pairs])
            geometries.append([p[1] for p in pairs])
        return tensors, geometries

    # ------------------------------------------------------------------ __call__
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        *,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = "left",
        truncation: bool = False,
        max_length: int | None = None,
        images_are_preprocessed: bool = False,
        chat: bool | None = None,
        add_special_tokens: bool = True,
        context_length: int | None = None,
        max_new_tokens: int = 0,
    ) -> BatchFeature:
        """Texts (+ images) -> ``BatchFeature``.

        ``text``: one string or a list (the batch). ``images``: for one text, an image or a list of images; for a
        list of texts, one entry per text (None, an image, or a list of images). An image is a path, a
        ``MetaTensor`` or an array (see :meth:`preprocess_image`). Each ``<image>`` is expanded to the image's
        tokens; a text without ``<image>`` but with images gets one placeholder per image in front (after a
        leading task marker). ``padding``: True/"longest", "max_length" or False; ``padding_side`` "left"
        (default: batched generation) or "right". ``chat``: override ``use_chat_template`` for this call.
        ``context_length``: the LLM's context (e.g. ``model.config.text_config.max_position_embeddings``); a prompt
        whose tokens after image expansion (after truncation, if asked) plus ``max_new_tokens`` exceed it is refused
        with the numbers (:func:`check_context_length`) before any image is read. ``bytes`` prompts and prompts
        holding lone surrogates are refused (:func:`check_text`).

        Returns ``input_ids (B, L)`` long, ``attention_mask (B, L)`` long (0 on pads), and when any image is given
        ``pixel_values (B, S, C, H, W, D)`` float32 and ``image_mask (B, S)`` bool; always ``grid_geometry``
        (B lists of per-image GridGeometry dicts; empty lists for text-only samples).
        """
        if text is None:
            raise RadFM3DInputError("text", "give a prompt (or a list of prompts); write <image> where images go")
        if isinstance(text, (bytes, bytearray, memoryview)):
            check_text(text, "text")
        single = isinstance(text, str)
        if not single and (isinstance(text, Mapping) or not hasattr(text, "__iter__")):
            raise RadFM3DInputError("text", f"give a string or a list of strings, got {type(text).__name__}")
        texts = [text] if single else [check_text(t, f"text[{i}]") for i, t in enumerate(text)]
        if not texts:
            raise RadFM3DInputError("text", "empty batch")
        per_sample = self._normalise_images(images, len(texts), single)
        encoded = [self._encode_prompt(t, len(imgs), i, chat, add_special_tokens)[0]
                   for i, (t, imgs) in enumerate(zip(texts, per_sample))]
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            encoded = [self._truncate(ids, int(max_length), i) for i, ids in enumerate(encoded)]
        if context_length is not None:
            check_context_length(encoded, context_length, max_new_tokens=max_new_tokens, source="text",
                                 image_token_ids=list(self.image_token_ids.values()))
        input_ids, attention_mask = self._pad(encoded, padding, padding_side or "left", max_length,
                                              return_tensors is not None)
        tensors, geometries = self._load_images(per_sample, images_are_preprocessed)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if any(tensors):
            data["pixel_values"], data["image_mask"] = self.stack_images(tensors)
        data["grid_geometry"] = geometries
        return self._batch_feature(data, return_tensors)

    def _pad(self, sequences: list[list[int]], padding: bool | str, side: str, max_length: int | None,
             rectangular: bool) -> tuple[Any, Any]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        lengths = [len(s) for s in sequences]
        if padding in (True, "longest"):
            width = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max(int(max_length), max(lengths))
        elif padding in (False, "do_not_pad"):
            if not rectangular:
                return [list(s) for s in sequences], [[1] * n for n in lengths]
            if len(set(lengths)) > 1:
                raise ValueError(f"sequences of different lengths {lengths} need padding (or return_tensors=None)")
            width = lengths[0]
        else:
            raise ValueError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")
        ids, mask = [], []
        for seq in sequences:
            fill = width - len(seq)
            if side == "left":
                ids.append([self.pad_token_id] * fill + list(seq))
                mask.append([0] * fill + [1] * len(seq))
            else:
                ids.append(list(seq) + [self.pad_token_id] * fill)
                mask.append([1] * len(seq) + [0] * fill)
        return ids, mask

    @staticmethod
    def _batch_feature(data: dict[str, Any], return_tensors: str | None) -> BatchFeature:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if return_tensors == "pt":
            for key in ("input_ids", "attention_mask", "labels"):
                if key in data and not isinstance(data[key], torch.Tensor):
                    data[key] = torch.tensor(data[key], dtype=torch.long)
        return BatchFeature(data, tensor_type=None, skip_tensor_conversion=_NON_TENSOR_KEYS)

    # ------------------------------------------------------------------ training
    def build_training_example(
        self,
        prompt: str,
        answer: str,
        images: Any = None,
        *,
        max_length: int | None = None,
        images_are_preprocessed: bool = False,
        chat: bool | None = None,
    ) -> dict[str, Any]:
        """One supervised example: prompt ids (identical to ``processor(prompt, images)``) + answer ids + EOS.

        Returns ``input_ids (L,)``, ``attention_mask (L,)``, ``labels (L,)`` (-100 on the prompt, its image tokens
        and BOS; the answer tokens and the EOS supervised), ``grid_geometry`` (list of dicts), and with images
        ``pixel_values (S, C, H, W, D)`` and ``image_mask (S,)``. A space is put between prompt and answer when the
        prompt does not end in whitespace. ``max_length`` truncates the answer (the prompt is never cut).
        """
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token: training needs one to end answers")
        per_sample = self._normalise_images(images, 1, single=True)
        prompt_ids, prepared = self._encode_prompt(prompt, len(per_sample[0]), 0, chat)
        answer = check_text(answer, "answer")
        for token in self._reserved + (self.image_placeholder,):
            if token in answer:
                raise RadFM3DInputError("answer", f"contains {token!r}; answers are plain text")
        if prepared and not prepared[-1].isspace() and answer and not answer[0].isspace():
            answer = " " + answer
        answer_ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [int(eos)]
        if max_length is not None:
            room = int(max_length) - len(prompt_ids)
            if room < 1:
                raise RadFM3DInputError("prompt", f"{len(prompt_ids)} prompt tokens leave no room for the answer "
                                        f"within max_length={max_length}")
            answer_ids = answer_ids[:room]
        input_ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        labels = torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer_ids, dtype=torch.long)
        example: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                                   "labels": labels}
        tensors, geometries = self._load_images(per_sample, images_are_preprocessed)
        if tensors[0]:
            pixel_values, image_mask = self.stack_images(tensors)
            example["pixel_values"], example["image_mask"] = pixel_values[0], image_mask[0]
        example["grid_geometry"] = geometries[0]
        return example

    def collate_training(self, examples: Sequence[Mapping[str, Any]]) -> BatchFeature:
        """Training examples -> right-padded batch: ``input_ids`` (pad id), ``attention_mask`` (0), ``labels``
        (-100) ``(B, L)``; ``pixel_values (B, S, C, H, W, D)`` / ``image_mask (B, S)`` when any example has images;
        ``grid_geometry`` kept when the examples carry it."""
        if not examples:
            raise ValueError("collate_training needs at least one example")
        width = max(int(torch.as_tensor(e["input_ids"]).numel()) for e in examples)
        batch = len(examples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        for b, e in enumerate(examples):
            ids = torch.as_tensor(e["input_ids"]).reshape(-1)
            n = ids.numel()
            input_ids[b, :n] = ids
            attention_mask[b, :n] = torch.as_tensor(e.get("attention_mask", torch.ones(n))).reshape(-1)
            labels[b, :n] = torch.as_tensor(e["labels"]).reshape(-1) if "labels" in e else IGNORE_INDEX
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if any(e.get("pixel_values") is not None for e in examples):
            per_sample = []
            for e in examples:
                pv = e.get("pixel_values")
                if pv is None:
                    per_sample.append([])
                    continue
                pv = torch.as_tensor(pv)
                pv = pv.unsqueeze(0) if pv.ndim == 4 else pv
                mask = torch.as_tensor(e.get("image_mask", torch.ones(pv.shape[0], dtype=torch.bool))).reshape(-1)
                per_sample.append([pv[s] for s in range(pv.shape[0]) if bool(mask[s])])
            data["pixel_values"], data["image_mask"] = self.stack_images(per_sample)
        if any("grid_geometry" in e for e in examples):
            data["grid_geometry"] = [list(e.get("grid_geometry") or []) for e in examples]
        return self._batch_feature(data, "pt")

    # ------------------------------------------------------------------ decoding
    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        """Token ids ``(B, T)`` -> texts (image and other special tokens dropped by default)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Token ids ``(T,)`` -> text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def boxes_from_text(self, text: str, grid_geometry: Any, image_index: int = 0) -> list[dict[str, Any]]:
        """``<box>`` boxes of generated text placed on the scan (:func:`radfm3d.text.postprocess.boxes_from_text`)."""
        from radfm3d.text.postprocess import boxes_from_text

        return boxes_from_text(text, grid_geometry, image_index)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """What ``processor_config.json`` holds (the recipe goes to ``preprocessing.json``)."""
        return {"format": _FORMAT, "version": 1, "processor_class": type(self).__name__,
                "num_image_tokens": self.num_image_tokens, "image_start_token": self.image_start_token,
                "image_end_token": self.image_end_token, "image_pad_token": self.image_pad_token,
                "image_placeholder": self.image_placeholder, "use_chat_template": self.use_chat_template,
                **self.image_token_ids}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the tokenizer files, ``preprocessing.json`` and ``processor_config.json`` into a folder.

        Every file is written atomically: all of them go to a temporary folder inside ``save_directory`` first and
        are then moved into place one by one with ``os.replace`` (``processor_config.json`` last), so a kill leaves
        each file either old or new, never half written."""
        return save_processor_files(save_directory, self.tokenizer, self.recipe, self.to_dict(), PROCESSOR_CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> RadFM3DProcessor:
        """Load a processor saved by :meth:`save_pretrained`; a model folder or preset without one is built with
        :meth:`from_model_config`. ``overrides`` replace ``__init__`` arguments (e.g. ``use_chat_template``, or
        ``recipe`` instead of the saved ``preprocessing.json``)."""
        path = Path(name_or_path)
        config_file = path / PROCESSOR_CONFIG_NAME
        if not config_file.is_file():
            return cls.from_model_config(name_or_path, **overrides)
        try:
            data = read_json_object(config_file)
        except RadFM3DInputError as err:
            raise RadFM3DInputError(config_file, f"unreadable processor config ({err.problem})") from None
        if "tokenizer" in data and data["tokenizer"] is None:
            raise RadFM3DInputError(path, "this folder has no tokenizer (a RadFM conversion without --tokenizer); "
                                    "convert again with --tokenizer /path/to/RadFM/Quick_demo/Language_files")
        if data.get("format") != _FORMAT:
            raise RadFM3DInputError(config_file, f"not a radfm3d processor config (format {data.get('format')!r})")
        from transformers import AutoTokenizer, PretrainedConfig

        # the folder's config.json is the model's (a radfm3d type transformers' AutoConfig does not know, so it would
        # warn about "a model of type ``"); the tokenizer class comes from tokenizer_config.json
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=PretrainedConfig())
        kwargs = {k: data[k] for k in ("num_image_tokens", "image_start_token", "image_end_token",
                                       "image_pad_token", "image_placeholder", "use_chat_template") if k in data}
        recipe = overrides.pop("recipe", None) or PreprocessingRecipe.load(path)
        kwargs.update(overrides)
        processor = cls(tokenizer, recipe, **kwargs)
        saved = {k: data[k] for k in processor.image_token_ids if k in data}
        if saved and saved != processor.image_token_ids:
            raise RadFM3DInputError(config_file, f"token ids changed on reload: saved {saved}, "
                                    f"tokenizer gives {processor.image_token_ids}")
        return processor

    @classmethod
    def from_base_llm(cls, name_or_path: str | os.PathLike = "smollm2-135m-instruct",
                      recipe: PreprocessingRecipe | None = None, num_image_tokens: int = 32,
                      **kwargs: Any) -> RadFM3DProcessor:
        """Processor around a base LLM's tokenizer (alias such as ``"smollm2-135m-instruct"``, a local transformers
        folder or a .gguf file; see :mod:`radfm3d.modeling.llm`), never touching the network."""
        return cls(_load_base_tokenizer(name_or_path), recipe, num_image_tokens, **kwargs)

    @classmethod
    def from_model_config(cls, name_or_path: Any, recipe: PreprocessingRecipe | None = None,
                          **kwargs: Any) -> RadFM3DProcessor:
        """Processor for a model preset (``"tiny"``, ``"demo"``), a model folder or a ``RadFM3DConfig``.

        Tokenizer: the base LLM's (``text_model_name_or_path``) or, for a randomly initialised LLM, the
        character tokenizer of :func:`build_char_tokenizer` sized to ``base_vocab_size``. Recipe: ``recipe``, else
        the folder's ``preprocessing.json``, else the preset's ``"preprocessing"`` entry, else the default.
        The processor's token ids are checked against the config's.
        """
        from radfm3d.modeling.configuration import PRESET_DIR, RadFM3DConfig

        if isinstance(name_or_path, RadFM3DConfig):
            config, preset_data = name_or_path, {}
        else:
            config = RadFM3DConfig.from_preset(name_or_path)
            preset_file = PRESET_DIR / f"{name_or_path}.json"
            path = Path(name_or_path)
            source = preset_file if preset_file.is_file() else path if path.is_file() else path / "config.json"
            preset_data = read_json_object(source) if source.is_file() else {}
            if recipe is None and (path / "preprocessing.json").is_file():
                recipe = PreprocessingRecipe.load(path)
        if recipe is None:
            spec = preset_data.get("preprocessing") or getattr(config, "preprocessing", None)
            recipe = PreprocessingRecipe.from_dict(spec) if spec else PreprocessingRecipe()
        if config.text_model_name_or_path:
            tokenizer = _load_base_tokenizer(config.text_model_name_or_path)
        else:
            tokenizer = build_char_tokenizer(int(config.image_start_token_id))
        processor = cls(tokenizer, recipe, int(config.tokens_per_image), **kwargs)
        processor.check_config(config)
        return processor

