# Copyright (c) radfm3d contributors. Apache-2.0.
"""The one place the server and the Slicer local mode touch the model: load, preprocess (cached), generate, boxes.

Only the public API is used: ``RadFM3DForCausalLM.from_pretrained``, ``RadFM3DProcessor.from_pretrained`` /
``from_model_config``, ``processor(text=..., images=...)``, ``model.generate(**inputs, ...)``,
``processor.batch_decode`` and ``processor.boxes_from_text``.

Model work is serialised with one lock (one generation at a time on the device); preprocessing runs outside it and
its result is cached by a caller-given key (a file id, or a Slicer node id + modified time).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from radfm3d.errors import RadFM3DInputError

__all__ = ["GenerationParams", "GenerationResult", "Engine", "Cancelled"]


class Cancelled(Exception):
    """Generation was stopped through its cancel event before it started."""


@dataclass
class GenerationParams:
    """Sampling options (OpenAI names). ``temperature`` None or 0 = greedy; ``stop``: strings that end the answer
    (not included in it)."""

    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationResult:
    """Answer text, why it ended (``"stop"``, ``"length"``, ``"cancelled"``), token counts, per-image boxes and
    timings in seconds."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    images: list[dict[str, Any]]
    timings_s: dict[str, float]


class _DeltaStreamer:
    """transformers streamer (``put``/``end``) -> text deltas: skips the prompt, decodes the new ids so far and
    hands on only what is new (holding back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer: Any, on_delta: Callable[[str], None]) -> None:
        self.tokenizer, self.on_delta = tokenizer, on_delta
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.on_delta(text[self.sent:])
            self.sent = len(text)


class _StopCriteria:
    """Stops a batch-of-one generation when ``cancel`` is set or the new text contains a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], cancel: threading.Event | None) -> None:
        self.tokenizer, self.stop, self.cancel = tokenizer, [s for s in stop if s], cancel
        self.steps = 0
        self.hit_stop = False

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        self.steps += 1
        done = bool(self.cancel is not None and self.cancel.is_set())
        if self.stop and not done:
            text = self.tokenizer.decode(input_ids[0, -self.steps:].tolist(), skip_special_tokens=True)
            if any(s in text for s in self.stop):
                self.hit_stop = done = True
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded) and whether one was found."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Engine:
    """A loaded model + processor with a preprocessing cache and a generation lock.

    Args:
        model: a ``RadFM3DForCausalLM`` (eval mode, on its device).
        processor: its ``RadFM3DProcessor``.
        model_id: the name clients use (``GET /v1/models``).
        source: where it was loaded from (reported, never a secret).
        cache_size: preprocessed volumes kept (least recently used dropped first).
    """

    def __init__(self, model: Any, processor: Any, model_id: str = "radfm3d", source: str | None = None,
                 cache_size: int = 32) -> None:
        self.model, self.processor = model, processor
        self.model_id, self.source = model_id, source
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._key_locks: dict[Any, threading.Lock] = {}  # one preprocessing per key at a time (no stampede)
        self.lock = threading.Lock()  # one generation at a time
        self.cache_hits = 0
        self.cache_misses = 0
        self.stats = {"generations": 0, "cancelled": 0, "generated_tokens": 0}  # since start

    @classmethod
    def load(cls, source: str | os.PathLike, device: str | None = None, dtype: str | None = None,
             model_id: str | None = None, cache_size: int = 32) -> Engine:
        """Load a saved model folder (or a preset name such as ``"tiny"``/``"demo"``) and its processor."""
        from radfm3d import RadFM3DForCausalLM, RadFM3DProcessor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs: dict[str, Any] = {} if dtype is None else {"dtype": getattr(torch, dtype)}
        model = RadFM3DForCausalLM.from_pretrained(str(source), **kwargs).eval().to(device)
        path = Path(source)
        processor = (RadFM3DProcessor.from_pretrained(path) if (path / "processor_config.json").is_file()
                     else RadFM3DProcessor.from_model_config(str(source)))
        name = model_id or (path.name if path.exists() else str(source))
        return cls(model, processor, name, str(source), cache_size)

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        """Model id, base LLM, preprocessing recipe, token budget and versions (``GET /v1/models``)."""
        import radfm3d

        config = self.model.config
        return {"id": self.model_id, "base_llm": getattr(config, "text_model_name_or_path", None) or "random (preset)",
                "recipe": self.processor.recipe.to_dict() if hasattr(self.processor.recipe, "to_dict")
                else dict(vars(self.processor.recipe)),
                "num_image_tokens": int(self.processor.num_image_tokens),
                "radfm3d_version": radfm3d.__version__, "torch_version": torch.__version__,
                "device": str(self.device)}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def count_tokens(self, text: str) -> int:
        """Tokens of plain text (no image expansion)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def reserved_tokens(self) -> tuple[str, ...]:
        """Token strings users may not write (the image tokens the processor inserts itself)."""
        p = self.processor
        return (p.image_start_token, p.image_end_token, p.image_pad_token)

    def estimate_prompt_tokens(self, prompt: str, n_images: int) -> int:
        """Prompt length with its images, from the text alone (an upper bound within a few tokens; the exact
        count is checked again in :meth:`generate`)."""
        return self.count_tokens(prompt) + n_images * (int(self.processor.num_image_tokens) + 2) + 1

    # ------------------------------------------------------------------ preprocessing
    def prepare(self, key: Any, source: Any) -> Any:
        """The preprocessed volume of ``source`` (a path, folder, ``MetaTensor``, or a no-argument callable returning
        one, called only on a cache miss) as a ``MetaTensor`` ``(C, H, W, D)`` carrying ``meta["grid_geometry"]``,
        cached under ``key`` (``None``: not cached)."""
        from monai.data import MetaTensor

        if key is None:
            tensor, geometry = self.processor.preprocess_image(source() if callable(source) else source)
            return MetaTensor(tensor, meta={"grid_geometry": geometry})
        with self._cache_lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # concurrent first requests on one scan: one preprocesses, the others wait for its result
            with self._cache_lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    self.cache_hits += 1
                    return self._cache[key]
            tensor, geometry = self.processor.preprocess_image(source() if callable(source) else source)
            prepared = MetaTensor(tensor, meta={"grid_geometry": geometry})
            with self._cache_lock:
                self.cache_misses += 1
                self._cache[key] = prepared
                while len(self._cache) > self.cache_size:
                    old, _ = self._cache.popitem(last=False)
                    self._key_locks.pop(old, None)
        return prepared

    def forget(self, key: Any) -> None:
        """Drop a cached volume (file deleted or expired)."""
        with self._cache_lock:
            self._cache.pop(key, None)
            self._key_locks.pop(key, None)

    def forget_where(self, predicate: Callable[[Any], bool]) -> None:
        """Drop every cached volume whose key matches."""
        with self._cache_lock:
            for key in [k for k in self._cache if predicate(k)]:
                del self._cache[key]
                self._key_locks.pop(key, None)

    # ------------------------------------------------------------------ prompts
    def format_conversation(self, turns: Sequence[tuple[str, str]], system: str | None = None) -> tuple[str, bool]:
        """``[(role, text), ...]`` ending with a user turn -> (prompt text, whether it is already chat-formatted).

        One user turn without a system message is used as written (the processor applies its own chat setting);
        several turns or a system message go through :func:`radfm3d.text.prompts.format_chat` with the history.
        """
        from radfm3d.text.prompts import format_chat

        if not turns or turns[-1][0] != "user":
            raise RadFM3DInputError("messages", "the last message must be the user's")
        if len(turns) == 1 and not system:
            return turns[0][1], False
        history: list[tuple[str, str]] = []
        pending: str | None = None
        for role, text in turns[:-1]:
            if role == "user":
                pending = text if pending is None else f"{pending}\n{text}"
            else:
                history.append((pending or "", text))
                pending = None
        last = turns[-1][1] if pending is None else f"{pending}\n{turns[-1][1]}"
        return format_chat(self.tokenizer, last, system=system, history=history), True

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str, images: Sequence[Any], params: GenerationParams, *,
                 formatted: bool = False, on_delta: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, max_prompt_tokens: int | None = None) -> GenerationResult:
        """Answer ``prompt`` (``<image>`` placeholders, one per entry of ``images``, preprocessed by :meth:`prepare`).

        ``on_delta`` receives text pieces as they are generated (before any box post-processing; the result's
        ``text`` is final). ``cancel`` stops generation between tokens. Boxes in the answer are placed on every
        image's grid (the answer does not say which image a box belongs to when there are several).
        """
        t0 = time.perf_counter()
        inputs = self.processor(text=[prompt], images=[list(images)] if images else None,
                                images_are_preprocessed=True, chat=False if formatted else None)
        geometries = list(inputs["grid_geometry"][0]) if inputs.get("grid_geometry") else []
        n_prompt = int(inputs["input_ids"].shape[1])
        if max_prompt_tokens is not None and n_prompt > max_prompt_tokens:
            raise RadFM3DInputError("messages", f"the prompt is {n_prompt} tokens with its images; the limit is "
                                    f"{max_prompt_tokens}")
        device = self.device
        dtype = next(self.model.parameters()).dtype
        model_inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if "pixel_values" in model_inputs:
            model_inputs["pixel_values"] = model_inputs["pixel_values"].to(dtype)
        gen: dict[str, Any] = {"max_new_tokens": int(params.max_tokens)}
        if params.temperature:
            gen.update(do_sample=True, temperature=float(params.temperature))
            if params.top_p is not None:
                gen["top_p"] = float(params.top_p)
        else:
            gen["do_sample"] = False
        criteria = _StopCriteria(self.tokenizer, params.stop, cancel)
        from transformers import StoppingCriteriaList

        gen["stopping_criteria"] = StoppingCriteriaList([criteria])
        if on_delta is not None:
            gen["streamer"] = _DeltaStreamer(self.tokenizer, on_delta)
        t1 = time.perf_counter()
        with self.lock:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled before generation started")
            t_locked = time.perf_counter()
            if params.seed is not None:
                torch.manual_seed(int(params.seed))
                if torch.cuda.is_available():
                    torch.cuda.manual_seed_all(int(params.seed))
            with torch.inference_mode():
                readings = [self._reading(image) for image in images]
                out = self.model.generate(**model_inputs, **gen)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            new_ids = sequences[0, n_prompt:].tolist()
        t2 = time.perf_counter()
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        while new_ids and pad is not None and new_ids[-1] == pad and pad != eos:
            new_ids.pop()
        text = self.processor.batch_decode([new_ids])[0]
        text, stopped = cut_at_stop(text, params.stop)
        ended_by_eos = bool(new_ids) and eos is not None and new_ids[-1] == eos
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif stopped or criteria.hit_stop or ended_by_eos or len(new_ids) < params.max_tokens:
            reason = "stop"
        else:
            reason = "length"
        self.stats["generations"] += 1
        self.stats["cancelled"] += int(reason == "cancelled")
        self.stats["generated_tokens"] += len(new_ids)
        images_out = [{"index": k, "grid_geometry": g, "boxes": self.boxes(text, g),
                       "reading": readings[k] if k < len(readings) else None} for k, g in enumerate(geometries)]
        return GenerationResult(text=text, finish_reason=reason, prompt_tokens=n_prompt,
                                completion_tokens=len(new_ids), images=images_out,
                                timings_s={"prepare_inputs": t1 - t0, "queue": t_locked - t1,
                                           "generate": t2 - t_locked, "total": time.perf_counter() - t0})

    def _reading(self, image: Any) -> dict[str, Any] | None:
        """The model's own reading of a prepared image (``model.read_findings``: modality, region, findings with
        scores) when it has a findings prompt, else ``None``; kept in the cached image's meta (computed once per
        volume). Call with the lock held."""
        meta = getattr(image, "meta", None)
        if meta is not None and "reading" in meta:
            return meta["reading"]
        reading = None
        if getattr(self.model, "reader", None) is not None and hasattr(self.model, "read_findings"):
            param = next(self.model.parameters())
            pixels = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)
            rows = self.model.read_findings(pixels[None, None].to(param.device, param.dtype))
            reading = rows[0][0] if rows and rows[0] else None
        if meta is not None:
            meta["reading"] = reading
        return reading

    def boxes(self, text: str, grid_geometry: Any) -> list[dict[str, Any]]:
        """``<box>`` boxes of ``text`` on one image: ``processor.boxes_from_text`` (0-99 steps, grid, original voxel
        indices, RAS mm bounds, centre, size) plus ``corners_world_mm`` (the box's 8 grid corners in RAS mm, order
        ``itertools.product((lo, hi), repeat=3)`` over grid axes) and ``axes_world`` (3x3, columns = the grid axes as
        RAS unit vectors), so that a box on an oblique grid is placed exactly (a Slicer ROI's orientation)."""
        from itertools import product

        import numpy as np

        from radfm3d.transforms import GridGeometry

        geometry = grid_geometry if isinstance(grid_geometry, GridGeometry) else GridGeometry.from_dict(grid_geometry)
        rotation = geometry.grid_affine[:3, :3]
        axes = rotation / np.linalg.norm(rotation, axis=0, keepdims=True)
        out = self.processor.boxes_from_text(text, geometry.to_dict())
        for box in out:
            lo, hi = box["box_grid"][:3], box["box_grid"][3:]
            corners = np.array([[(hi if bit else lo)[a] for a, bit in enumerate(bits)]
                                for bits in product((0, 1), repeat=3)], dtype=np.float64)
            box["corners_world_mm"] = np.asarray(geometry.grid_to_world(corners), dtype=np.float64).round(6).tolist()
            box["axes_world"] = axes.round(9).tolist()
        return out
