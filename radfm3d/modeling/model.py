# Copyright (c) radfm3d contributors. Apache-2.0.
"""``RadFM3DForCausalLM``: 3D ViT -> perceiver resampler -> projector -> visual tokens scattered into a causal LLM.

Token contract (see ``RadFM3DConfig``): ids ``< base_vocab_size`` are the LLM's own; ids ``>= base_vocab_size``
(image start/end/placeholder, ...) are rows of ``extra_token_embeddings``. The embeddings at the placeholder
positions are replaced, in order, by the projected visual tokens of the sample's real images (masked scatter;
no one-hot product, no resizing of the LLM's embedding or lm_head, so image ids can never be generated).

Checkpoint folder: ``config.json`` + ``model.safetensors`` holding the trainable parts (``vision_model.*``,
``resampler.*``, ``projector.*``, ``extra_token_embeddings.*``, adapter weights ``language_model.*lora_*``) and,
when the base LLM is not named (or ``save_base=True``), the whole ``language_model.*``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from radfm3d.errors import RadFM3DInputError
from radfm3d.modeling.configuration import RadFM3DConfig
from radfm3d.modeling.resampler import PerceiverResampler
from radfm3d.modeling.vision import VisionTransformer3D
from radfm3d.utils import atomic_write

__all__ = ["RadFM3DPreTrainedModel", "RadFM3DForCausalLM", "causal_lm_loss", "WEIGHTS_NAME", "ADAPTER_CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_ADAPTER_MARKERS = ("lora_", "modules_to_save")


def _is_adapter_key(name: str) -> bool:
    return any(marker in name for marker in _ADAPTER_MARKERS)


# options of ``from_pretrained`` handed to the base LLM's loader (accelerate offload, bitsandbytes int8)
_LLM_LOAD_OPTIONS = ("max_memory", "offload_folder", "offload_state_dict", "quantization_config", "low_cpu_mem_usage")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
                   ignore_index: int = -100) -> torch.Tensor:
    """Shifted next-token cross-entropy in fp32: logits (B, L, V) at t predict labels (B, L) at t + 1.

    ``ignore_index`` (prompt, image and pad positions) and ids outside the LLM vocabulary (image ids) do not count.
    The mean over counted tokens, or their sum / ``num_items_in_batch`` (gradient accumulation); a batch without a
    counted token gives a zero that keeps the graph.
    """
    labels = labels.to(logits.device)
    labels = labels.masked_fill(labels >= logits.shape[-1], ignore_index)
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    if not bool((shift_labels != ignore_index).any()):
        return shift_logits.sum() * 0.0
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum") / num_items_in_batch


def check_checkpoint_state(source: Any, loaded: dict[str, torch.Tensor], missing: list[str] | None = None,
                           unexpected: list[str] | None = None) -> None:
    """A loaded state dict's keys (``missing`` / ``unexpected``, sorted) and values: a mismatch or a floating tensor
    holding NaN or inf is a ``RadFM3DInputError`` naming ``source`` (the checkpoint) and the keys."""
    missing, unexpected = list(missing or []), list(unexpected or [])
    if missing or unexpected:
        raise RadFM3DInputError(
            source,
            f"checkpoint does not match the model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}",
        )
    for name, tensor in loaded.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RadFM3DInputError(source, f"tensor {name!r} of the checkpoint holds NaN or inf values")


def checked_image_mask(pixel_values: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, S)`` bool mask of the present images of ``pixel_values (B, S, C, H, W, D)`` (all present when None);
    a mask of another shape is a ``RadFM3DInputError``."""
    b, s = pixel_values.shape[:2]
    if image_mask is None:
        return torch.ones(b, s, dtype=torch.bool, device=pixel_values.device)
    if tuple(image_mask.shape) != (b, s):
        raise RadFM3DInputError(
            "image_mask", f"shape {tuple(image_mask.shape)} does not match pixel_values (B, S)=({b}, {s})")
    return image_mask.to(device=pixel_values.device, dtype=torch.bool)


class RadFM3DPreTrainedModel(PreTrainedModel):
    """Base class: config class, gradient-checkpointing support, no re-initialisation of a loaded LLM."""

    config_class = RadFM3DConfig
    base_model_prefix = "radfm3d"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["ViTBlock3D", "PerceiverAttention"]

    def init_weights(self) -> None:
        """Our modules initialise themselves in their constructors (PyTorch defaults) and the LLM is built or loaded
        by its own class, so nothing is re-initialised here (a loaded base LLM must never be overwritten)."""

    def _init_weights(self, module: nn.Module) -> None:  # pragma: no cover - see init_weights
        pass


class RadFM3DForCausalLM(RadFM3DPreTrainedModel):
    """Vision-language causal LM. Parts: ``vision_model``, ``resampler``, ``projector``, ``language_model``,
    ``extra_token_embeddings``.

    ``RadFM3DForCausalLM(config)`` builds the LLM from ``config.text_config`` (random weights); use
    :meth:`from_pretrained` (folder or preset name) to get the named base LLM loaded.
    """

    def __init__(self, config: RadFM3DConfig, language_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            config.text_config = language_model.config
        text_hidden = int(language_model.config.hidden_size)
        llm_vocab = int(language_model.get_input_embeddings().num_embeddings)
        if config.base_vocab_size > llm_vocab:
            raise ValueError(f"base_vocab_size {config.base_vocab_size} exceeds the LLM's vocabulary {llm_vocab}")
        vision_hidden = config.vision.hidden_size
        self.vision_model = VisionTransformer3D(config.vision_config)
        self.resampler = PerceiverResampler(config.resampler_config)
        if config.projector_type == "linear":
            self.projector: nn.Module = nn.Linear(vision_hidden, text_hidden, bias=config.projector_bias)
        else:
            self.projector = nn.Sequential(
                nn.Linear(vision_hidden, text_hidden, bias=config.projector_bias),
                nn.GELU(),
                nn.Linear(text_hidden, text_hidden, bias=config.projector_bias),
            )
        self.language_model = language_model
        self.extra_token_embeddings = nn.Embedding(config.num_extra_tokens, text_hidden)
        with torch.no_grad():  # start new rows at the statistics of the base table, so they sit among real tokens
            base = language_model.get_input_embeddings().weight
            if base.device.type != "meta":
                base = base.detach().float()
                self.extra_token_embeddings.weight.normal_(0.0, 1.0)
                self.extra_token_embeddings.weight.mul_(base.std()).add_(base.mean(0))
        self.extra_token_embeddings.to(dtype=language_model.get_input_embeddings().weight.dtype)
        self.post_init()

    # ------------------------------------------------------------------ transformers plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    @property
    def num_image_tokens(self) -> int:
        return int(self.config.num_image_tokens)

    # ------------------------------------------------------------------ images
    def get_visual_latents(self, pixel_values: torch.Tensor, return_patch_tokens: bool = False) -> Any:
        """``(M, C, H, W, D)`` -> resampler latents ``(M, N, vision_hidden)`` (before the projector).

        ``return_patch_tokens``: also return the encoder's patch tokens ``(M, nh*nw*nd, vision_hidden)`` and the
        patch grid ``(nh, nw, nd)``, as ``(latents, tokens, grid)``.
        """
        param = next(self.vision_model.parameters())
        tokens = self.vision_model(pixel_values.to(device=param.device, dtype=param.dtype))
        patch = self.config.vision.patch_size
        grid = tuple(int(s) // int(p) for s, p in zip(pixel_values.shape[-3:], patch))
        latents = self.resampler(tokens, grid=grid)
        return (latents, tokens, grid) if return_patch_tokens else latents

    @property
    def tokens_per_image(self) -> int:
        """Placeholders per image (``config.tokens_per_image``: the visual tokens, plus the slots a subclass adds)."""
        return int(self.config.tokens_per_image)

    def _encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(M, C, H, W, D)`` -> the ``(M, tokens_per_image, text_hidden)`` embeddings scattered into each image's
        placeholders: the projected visual tokens (a subclass may append embeddings of its own)."""
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(self.get_visual_latents(pixel_values).to(proj_dtype))

    def get_image_features(
        self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected visual tokens (what the LLM receives).

        ``pixel_values (B, S, C, H, W, D)`` (or ``(B, C, H, W, D)`` = one image per sample), ``image_mask (B, S)``
        bool (True = real image; default all) -> ``(B, S, N, text_hidden)``; padded image slots are zeros and are
        never run through the encoder.
        """
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.ndim != 6:
            raise RadFM3DInputError(
                "pixel_values", f"expected (B, S, C, H, W, D) or (B, C, H, W, D), got {tuple(pixel_values.shape)}"
            )
        b, s = pixel_values.shape[:2]
        mask = self._image_mask(pixel_values, image_mask)
        real = self._encode_images(pixel_values[mask])  # (M, N, hidden), M = mask.sum()
        out = real.new_zeros(b, s, *real.shape[1:])
        out[mask.to(out.device)] = real
        return out

    @staticmethod
    def _image_mask(pixel_values: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        return checked_image_mask(pixel_values, image_mask)

    # ------------------------------------------------------------------ embeddings
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, L) -> (B, L, hidden)``: base ids from the LLM table, ids ``>= base_vocab_size``
        from ``extra_token_embeddings`` (scatter of the few extra rows; no one-hot, no table resize)."""
        base_vocab, n_extra = int(self.config.base_vocab_size), int(self.config.num_extra_tokens)
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= base_vocab + n_extra):
            raise RadFM3DInputError(
                "input_ids", f"ids must lie in [0, {base_vocab + n_extra}) (base vocabulary + {n_extra} extra tokens)"
            )
        table = self.language_model.get_input_embeddings()
        is_extra = input_ids >= base_vocab
        embeds = table(input_ids.clamp(max=base_vocab - 1))
        if bool(is_extra.any()):
            rows = self.extra_token_embeddings(input_ids[is_extra] - base_vocab).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_extra.unsqueeze(-1), rows.to(embeds.device))
        return embeds

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``inputs_embeds (B, L, hidden)`` with the visual tokens of sample b's real images (in slot order)
        scattered into its ``image_token_id`` positions. Each sample needs exactly ``N x (its real images)``
        placeholders."""
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == int(self.config.image_token_id)
        placeholders = is_image.sum(dim=1)
        n = self.tokens_per_image
        if pixel_values is None:
            if bool(placeholders.any()):
                raise RadFM3DInputError(
                    "input_ids", "the text holds image placeholder tokens but no pixel_values were given")
            return embeds
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise RadFM3DInputError(
                "pixel_values", f"batch size {pixel_values.shape[0]} != input_ids batch size {input_ids.shape[0]}"
            )
        mask = self._image_mask(pixel_values, image_mask)
        expected = mask.sum(dim=1).to(placeholders.device) * n
        if not torch.equal(placeholders, expected):
            bad = [
                f"sample {i}: {int(p)} placeholders for {int(e) // n} image(s) x {n} tokens = {int(e)}"
                for i, (p, e) in enumerate(zip(placeholders.tolist(), expected.tolist()))
                if p != e
            ]
            raise RadFM3DInputError("input_ids", "image placeholder count mismatch: " + "; ".join(bad))
        if not bool(mask.any()):
            return embeds
        visual = self._encode_images(pixel_values[mask])  # (M, N, hidden) in (b, s) order
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.to(device=embeds.device, dtype=embeds.dtype))

    # ------------------------------------------------------------------ forward / loss
    @staticmethod
    def _position_ids(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Positions counting only attended tokens (left padding safe), last ``length`` columns."""
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids = position_ids.masked_fill(attention_mask == 0, 0)
        return position_ids[:, -length:]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits ``(B, L, base vocab)``; ``loss`` = mean shifted cross-entropy over labels != -100 (labels of
        image/extra ids are ignored too); with ``num_items_in_batch`` the sum is divided by it instead.
        ``cache`` (alias ``past_key_values``) is the LLM's KV cache (transformers 5 naming)."""
        kwargs.pop("grid_geometry", None)  # processor output kept for box post-processing; not a model input
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is not None:
            kwargs["cache"] = cache
        if inputs_embeds is None:
            if input_ids is None:
                raise RadFM3DInputError("forward", "give input_ids (or inputs_embeds)")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_mask)
        if position_ids is None and attention_mask is not None:
            position_ids = self._position_ids(attention_mask, inputs_embeds.shape[1])
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        loss = None
        if labels is not None:
            loss = self.loss_from_logits(outputs.logits, labels, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=outputs.logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def loss_from_logits(
        self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """:func:`causal_lm_loss` of ``logits`` (B, L, V) against ``labels`` (B, L)."""
        return causal_lm_loss(logits, labels, num_items_in_batch)

    # ------------------------------------------------------------------ generation
    def _check_generation_request(self, input_ids: torch.Tensor, gen_kwargs: dict[str, Any]) -> None:
        """Refuse, before any compute, ``max_new_tokens < 1`` and a prompt (image placeholders included) that with
        ``max_new_tokens`` does not fit the LLM's context (``text_config.max_position_embeddings``)."""
        new = gen_kwargs.get("max_new_tokens")
        if new is not None and (isinstance(new, bool) or not isinstance(new, int) or new < 1):
            raise RadFM3DInputError("generate", f"max_new_tokens must be a whole number >= 1, got {new!r}")
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is None:
            return
        prompt = int(input_ids.shape[-1])
        total = prompt + (int(new) if new is not None else 0)
        max_length = gen_kwargs.get("max_length")
        if new is None and isinstance(max_length, int):
            total = max(total, max_length)
        if total > int(limit):
            raise RadFM3DInputError(
                "generate", f"the prompt is {prompt} tokens after image-token expansion "
                f"({self.tokens_per_image} per image){f' + max_new_tokens {new}' if new is not None else ''} = "
                f"{total}, more than the LLM's context of {int(limit)} tokens")

    def generation_stop_ids(self) -> tuple[Any, Any]:
        """``(eos, pad)`` ids ``generate`` uses by default: the LLM's generation config, else its config (pad falls
        back to eos)."""
        gen_config = self.language_model.generation_config
        eos = gen_config.eos_token_id if gen_config.eos_token_id is not None else self.config.text_config.eos_token_id
        pad = gen_config.pad_token_id
        if pad is None:
            pad = self.config.text_config.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        return eos, pad

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        **gen_kwargs: Any,
    ) -> Any:
        """Embed once (images scattered in), then run the LLM's own ``generate`` (KV cache, greedy/sampling,
        every HF option). Returns ``prompt ids + new ids`` (or the usual output object with ``.sequences``).
        Left-pad batches (positions are taken from ``attention_mask``). ``max_new_tokens < 1`` and prompts longer
        than the LLM's context raise :class:`~radfm3d.errors.RadFM3DInputError` before any compute."""
        gen_kwargs.pop("grid_geometry", None)  # so that ``model.generate(**processor(...))`` works as is
        self._check_generation_request(input_ids, gen_kwargs)
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_mask)
        eos, pad = self.generation_stop_ids()
        gen_kwargs.setdefault("eos_token_id", eos)
        gen_kwargs.setdefault("pad_token_id", pad)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # logits processors index scores with the prompt ids: keep them inside the LLM vocabulary
        safe_ids = input_ids.masked_fill(input_ids >= int(self.config.base_vocab_size), int(pad or 0))
        out = self.language_model.generate(
            input_ids=safe_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **gen_kwargs
        )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        if sequences.shape[1] >= input_ids.shape[1] and torch.equal(sequences[:, : input_ids.shape[1]], safe_ids):
            sequences[:, : input_ids.shape[1]] = input_ids
        return out

    # ------------------------------------------------------------------ training switches
    def freeze(
        self,
        vision: bool | None = None,
        resampler: bool | None = None,
        projector: bool | None = None,
        llm: bool | None = None,
        extra_tokens: bool | None = None,
    ) -> dict[str, int]:
        """Freeze (True) / unfreeze (False) parts; None leaves a part as it is. Adapter (LoRA) weights inside the
        LLM stay trainable when the LLM is frozen. Returns the trainable parameter count per part."""
        parts = {
            "vision": (self.vision_model, vision),
            "resampler": (self.resampler, resampler),
            "projector": (self.projector, projector),
            "extra_tokens": (self.extra_token_embeddings, extra_tokens),
        }
        for module, flag in parts.values():
            if flag is not None:
                module.requires_grad_(not flag)
        if llm is not None:
            for name, param in self.language_model.named_parameters():
                param.requires_grad_(_is_adapter_key(name) or not llm)
        counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in parts.items()}
        counts["llm"] = sum(p.numel() for p in self.language_model.parameters() if p.requires_grad)
        return counts

    def add_lora(self, lora_config: Any) -> None:
        """Inject LoRA adapters (a ``peft.LoraConfig``) into the LLM with ``peft.inject_adapter_in_model``; their
        weights (``...lora_A/B...``) are then saved with the trainable parts, the config as ``adapter_config.json``.
        Only the adapter weights of the LLM stay trainable afterwards (``freeze(llm=True)``)."""
        _inject_lora(self.language_model, lora_config)
        self.freeze(llm=True)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing for the ViT blocks, the resampler layers and the LLM's decoder layers."""
        if enable:
            self.activation_checkpointing_enable()
        else:
            self.activation_checkpointing_disable()

    # ------------------------------------------------------------------ save / load
    def _saves_base(self, save_base: bool) -> bool:
        return bool(save_base) or not self.config.text_model_name_or_path

    def _checkpoint_state(self, with_base: bool) -> dict[str, torch.Tensor]:
        """State dict of what a checkpoint holds; tensors sharing storage (tied weights) are kept once."""
        state: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for name, tensor in self.state_dict().items():
            if name.startswith("language_model.") and not (with_base or _is_adapter_key(name)):
                continue
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            state[name] = tensor
        return state

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | os.PathLike, save_base: bool = False, **_: Any
    ) -> list[Path]:
        """Write ``config.json`` and ``model.safetensors`` (trainable parts; the whole LLM too if ``save_base`` or
        the base is not named) atomically, file by file, keeping other files of the folder (processor, ...)."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        with_base = self._saves_base(save_base)
        state = {k: v.detach().contiguous().cpu() for k, v in self._checkpoint_state(with_base).items()}
        metadata = {"format": "pt", "radfm3d_with_base": str(with_base)}
        written = [folder / WEIGHTS_NAME, folder / "config.json"]
        atomic_write(written[0], lambda tmp: save_file(state, tmp, metadata=metadata))
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        atomic_write(written[1], lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))
        peft_config = getattr(self.language_model, "peft_config", None)
        if peft_config:
            if len(peft_config) > 1:
                raise ValueError("saving more than one adapter is not supported; merge or delete the others first")
            adapter = next(iter(peft_config.values())).to_dict()
            adapter = {k: (sorted(v) if isinstance(v, set) else v) for k, v in adapter.items()}
            written.append(folder / ADAPTER_CONFIG_NAME)
            atomic_write(written[-1], lambda tmp: Path(tmp).write_text(json.dumps(adapter, indent=2, default=str)))
        return written

    @classmethod
    def _read_config(cls, folder: Path) -> RadFM3DConfig:
        """``folder/config.json`` -> this class's config; every key must be one the config class knows (a mistyped or
        unknown key is a :class:`~radfm3d.errors.RadFM3DInputError` naming it)."""
        path = folder / "config.json"
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RadFM3DInputError(path, f"not JSON ({err.msg})") from None
        data = cls._migrate_config(data, folder)
        config_class = cls.config_class
        unknown = sorted(set(data) - config_class.known_keys())
        if unknown:
            raise RadFM3DInputError(path, f"unknown config key {unknown[0]!r}" + (
                f" (and {unknown[1:]})" if len(unknown) > 1 else "") + f" for {config_class.__name__}; known keys: "
                f"{', '.join(sorted(config_class.own_keys()))}"
                + ("; this is an older findings model: `radfm3d findings-migrate FOLDER` rewrites its config"
                   if "findings_prompt" in unknown else ""))
        data.pop("model_type", None)
        try:
            return config_class(**data)
        except (TypeError, ValueError) as err:
            raise RadFM3DInputError(path, str(err)) from None

    @classmethod
    def _migrate_config(cls, data: dict[str, Any], folder: Path) -> dict[str, Any]:
        """Bring an older ``config.json`` (as a dict) up to this class's layout (nothing to do for the base)."""
        return data

    @classmethod
    def _checkpoint_class(cls, folder: Path) -> type[RadFM3DForCausalLM]:
        """The class a checkpoint folder names in its ``config.json`` ``auto_map`` (transformers' convention for
        model classes outside transformers; only ``radfm3d.`` modules are imported), else ``cls``."""
        import importlib

        try:
            data = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return cls
        target = (data.get("auto_map") or {}).get("AutoModelForCausalLM")
        if not target or target.rsplit(".", 1)[-1] == cls.__name__:
            return cls
        module_name, _, name = str(target).rpartition(".")
        if not module_name.startswith("radfm3d."):
            raise RadFM3DInputError(folder / "config.json", f"auto_map names {target!r}, outside radfm3d")
        found = getattr(importlib.import_module(module_name), name, None)
        if not (isinstance(found, type) and issubclass(found, RadFM3DForCausalLM)):
            raise RadFM3DInputError(folder / "config.json", f"auto_map names {target!r}, not a RadFM3DForCausalLM")
        if not issubclass(found, cls):
            raise RadFM3DInputError(folder / "config.json", f"this checkpoint is a {found.__name__}, not a "
                                    f"{cls.__name__}")
        return found

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        load_text_weights: bool = True,
        **kwargs: Any,
    ) -> RadFM3DForCausalLM:
        """Load a checkpoint folder (or build a fresh model from a preset name, e.g. ``"demo"``).

        A folder whose ``config.json`` names a subclass in ``auto_map`` (e.g. a findings model) is loaded as that
        class. ``load_text_weights=False`` builds the LLM from ``config.text_config`` with random weights instead of
        loading the named base (which stays named in the config, so a later save/load uses the real one): for work
        that never runs the LLM, e.g. vision pre-training on a machine without the base LLM's files.

        The named base LLM is loaded through :func:`radfm3d.modeling.llm.load_base_llm` (with ``dtype`` and
        ``device_map``; a relative ``text_model_name_or_path`` is looked up inside the checkpoint folder first, e.g.
        ``"llm"`` for a converted RadFM); the saved parts are then loaded strictly (missing or unexpected keys raise)
        and checked finite (a NaN/inf tensor raises naming it).
        """
        from radfm3d.modeling.llm import is_alias, load_base_llm

        source = Path(pretrained_model_name_or_path)
        is_folder = (source / "config.json").is_file()
        if is_folder:
            klass = cls._checkpoint_class(source)
            if klass is not cls:
                return klass.from_pretrained(source, dtype=dtype, device_map=device_map,
                                             load_text_weights=load_text_weights, **kwargs)
            config = cls._read_config(source)
        else:
            config = cls.config_class.from_preset(pretrained_model_name_or_path)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        base_name = config.text_model_name_or_path
        if base_name and is_folder and not is_alias(base_name) and not Path(base_name).is_absolute() \
                and (source / base_name).exists():
            base_name = str(source / base_name)  # a base stored inside the checkpoint folder, named relatively
        if base_name and load_text_weights:
            # big-model options (max_memory, offload_folder, quantization_config, ...) go to transformers' loader
            llm_kwargs = {k: kwargs[k] for k in _LLM_LOAD_OPTIONS if k in kwargs}
            language_model, _ = load_base_llm(base_name, dtype=dtype, device_map=device_map, **llm_kwargs)
        else:
            language_model = AutoModelForCausalLM.from_config(
                config.text_config, dtype=dtype if isinstance(dtype, torch.dtype) else None
            )
        if is_folder and (source / ADAPTER_CONFIG_NAME).is_file():
            language_model = _attach_adapter(language_model, source / ADAPTER_CONFIG_NAME)
        model = cls._build_loaded(config, language_model, source if is_folder else None)
        device = language_model.get_input_embeddings().weight.device
        own_dtype = dtype if isinstance(dtype, torch.dtype) else None
        for part in model._own_parts():
            part.to(device=device if device.type != "meta" else "cpu", dtype=own_dtype)
        if is_folder:
            model._load_checkpoint_state(source)
        model.eval()
        return model

    @classmethod
    def _build_loaded(cls, config: RadFM3DConfig, language_model: PreTrainedModel, folder: Path | None
                      ) -> RadFM3DForCausalLM:
        """The model :meth:`from_pretrained` fills (a subclass may read more files of ``folder``)."""
        return cls(config, language_model=language_model)

    def _own_parts(self) -> list[nn.Module]:
        """The parts outside the LLM (placed on the LLM's device when loading)."""
        return [self.vision_model, self.resampler, self.projector, self.extra_token_embeddings]

    def _upgrade_checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename / drop the keys of an older checkpoint layout (nothing to do for the base)."""
        return state

    def _load_checkpoint_state(self, folder: Path) -> None:
        from safetensors import safe_open

        files = self._weight_files(folder)
        loaded: dict[str, torch.Tensor] = {}
        with_base = False
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
                with_base = with_base or meta.get("radfm3d_with_base") == "True"
                for key in handle.keys():
                    loaded[key] = handle.get_tensor(key)
        loaded = self._upgrade_checkpoint_state(loaded)
        if not any(k.startswith("language_model.") and not _is_adapter_key(k) for k in loaded):
            with_base = False
        expected = set(self._checkpoint_state(with_base))
        check_checkpoint_state(folder, loaded, sorted(expected - set(loaded)), sorted(set(loaded) - expected))
        result = self.load_state_dict(loaded, strict=False)
        still_missing = sorted(set(result.unexpected_keys))
        if still_missing:  # pragma: no cover - guarded by the key check above
            raise RadFM3DInputError(folder, f"unexpected keys {still_missing}")

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        if (folder / WEIGHTS_NAME).is_file():
            return [folder / WEIGHTS_NAME]
        index = folder / WEIGHTS_INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        raise RadFM3DInputError(folder, f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in the checkpoint folder")

    def trainable_state_keys(self) -> list[str]:
        """Keys that :meth:`save_pretrained` writes without ``save_base`` (for converters and tests)."""
        return list(self._checkpoint_state(self._saves_base(False)))


def _inject_lora(language_model: PreTrainedModel, lora_config: Any) -> None:
    from peft import inject_adapter_in_model

    if getattr(language_model, "peft_config", None):
        raise ValueError("the language model already has an adapter")
    inject_adapter_in_model(lora_config, language_model, adapter_name="default")
    language_model.peft_config = {"default": lora_config}


def _attach_adapter(language_model: PreTrainedModel, adapter_config: Path) -> PreTrainedModel:
    """Re-create the (LoRA) adapter structure saved with a checkpoint, so its weights can be loaded strictly."""
    try:
        from peft import LoraConfig
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise RadFM3DInputError(adapter_config, "this checkpoint has adapters; install peft") from err
    data = json.loads(adapter_config.read_text())
    if data.get("peft_type", "LORA") not in ("LORA", "PeftType.LORA"):
        raise RadFM3DInputError(adapter_config, f"unsupported adapter type {data.get('peft_type')!r} (only LORA)")
    fields = set(LoraConfig.__dataclass_fields__)
    skip = {"peft_type", "task_type", "runtime_config"}
    _inject_lora(language_model, LoraConfig(**{k: v for k, v in data.items() if k in fields and k not in skip}))
    return language_model
