# Copyright (c) radfm3d contributors. Apache-2.0.
"""Local mode: the model inside this Python process (3D Slicer's, or any), with the same ``upload`` / ``ask`` shape
as :class:`radfm3d.client.RadFM3DClient`.

The model is loaded on first use and kept; each volume's preprocessed grid is cached by (node ID, modified time) for
Slicer volumes and by (path, mtime, size) for files, so follow-up questions do not preprocess again. All model calls
go through :class:`radfm3d.serve.engine.Engine`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radfm3d.client import Answer
from radfm3d.errors import RadFM3DInputError

__all__ = ["LocalRunner"]

_IMAGE = "<image>"


def _summary(array_ijk_shape: Sequence[int], affine: np.ndarray) -> dict[str, Any]:
    return {"spatial_shape": [int(s) for s in array_ijk_shape],
            "spacing_mm": [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)],
            "affine_ras": np.asarray(affine, dtype=np.float64).round(6).tolist()}


class LocalRunner:
    """Runs a radfm3d model in process.

    Args:
        model: a model folder or preset name (loaded on the first :meth:`ask`), unless ``engine`` is given.
        device / dtype: where and how to load it (default: CUDA when available, float32).
        engine: an already loaded :class:`radfm3d.serve.engine.Engine`.
    """

    def __init__(self, model: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
                 engine: Any = None) -> None:
        if engine is None and model is None:
            raise ValueError("give a model folder/preset or an engine")
        self.model_source, self.device, self.dtype = model, device, dtype
        self._engine = engine
        self._load_lock = threading.Lock()
        self._volumes: dict[str, dict[str, Any]] = {}

    @property
    def engine(self) -> Any:
        """The loaded engine (loads the model the first time)."""
        with self._load_lock:
            if self._engine is None:
                from radfm3d.serve.engine import Engine

                self._engine = Engine.load(self.model_source, device=self.device, dtype=self.dtype)
            return self._engine

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    # ------------------------------------------------------------------ volumes
    def upload(self, path: str | os.PathLike) -> dict[str, Any]:
        """Register a scan file or DICOM folder; returns ``{"id", "object", "filename", "geometry"}`` like the
        server's upload (read once now to check it and report its geometry)."""
        from radfm3d.io import load_image
        from radfm3d.serve.files import geometry_summary

        resolved = Path(path).expanduser().resolve()
        image = load_image(resolved)
        st = resolved.stat()
        file_id = f"local-path-{len(self._volumes)}-{resolved.name}"
        key = ("path", str(resolved), st.st_mtime_ns, st.st_size)
        info = {"id": file_id, "object": "file", "filename": resolved.name, "geometry": geometry_summary(image)}
        self._volumes[file_id] = {"key": key, "loader": lambda: load_image(resolved), "info": info}
        return info

    def add_volume(self, array_kji: np.ndarray, ijk_to_ras: Any, cache_key: tuple,
                   name: str = "volume", modality: str | None = None) -> dict[str, Any]:
        """Register a Slicer volume (``(K, J, I)`` array, IJKToRAS) under ``cache_key`` = (node ID, modified time,
        ...) (:func:`radfm3d.slicer.nodes.volume_cache_key`);
        the id is the node's, so a modified node replaces its earlier entry (and cache key). ``modality``: "CT",
        "MR", ... (default: :func:`radfm3d.slicer.geometry.guess_modality`, the file readers' rule)."""
        from radfm3d.slicer.geometry import guess_modality, kji_to_model_array

        array, affine = kji_to_model_array(array_kji, ijk_to_ras)
        modality = modality or guess_modality(array)
        file_id = f"local-node-{cache_key[0]}"
        old = self._volumes.get(file_id)
        if old is not None and old["key"] != ("node", *cache_key) and self._engine is not None:
            self._engine.forget(old["key"])

        def load() -> Any:
            from radfm3d.io import load_image

            return load_image(array, affine=affine, modality=modality)

        info = {"id": file_id, "object": "file", "filename": name,
                "geometry": {**_summary(array.shape, affine), "modality": modality or "unknown"}}
        self._volumes[file_id] = {"key": ("node", *cache_key), "loader": load, "info": info}
        return info

    def delete(self, file_id: str) -> bool:
        entry = self._volumes.pop(file_id, None)
        if entry is not None and self._engine is not None:
            self._engine.forget(entry["key"])
        return entry is not None

    # ------------------------------------------------------------------ ask
    def ask(self, file_ids: Sequence[str] | str, prompt: str, *, max_tokens: int = 256,
            temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
            stop: Sequence[str] | None = None, history: Sequence[dict[str, Any]] | None = None,
            stream: bool = False, on_delta: Callable[[str], None] | None = None,
            cancel: threading.Event | None = None) -> Answer:
        """Same arguments and result as :meth:`radfm3d.client.RadFM3DClient.ask`; ``cancel`` stops generation
        between tokens."""
        from radfm3d.serve.engine import Cancelled, GenerationParams

        ids = [file_ids] if isinstance(file_ids, str) else list(file_ids)
        entries = []
        for file_id in ids:
            if file_id not in self._volumes:
                raise RadFM3DInputError(file_id, "unknown volume id; register it with upload() or add_volume()")
            entries.append(self._volumes[file_id])
        engine = self.engine
        prepared = [engine.prepare(e["key"], e["loader"]) for e in entries]
        text = str(prompt)
        if entries and _IMAGE not in text:
            text = " ".join([_IMAGE] * len(entries) + [text])
        turns: list[tuple[str, str]] = []
        system = None
        for msg in history or []:
            content = msg.get("content")
            content = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content or [] if p.get("type") == "text")
            if msg.get("role") in ("system", "developer"):
                system = content
            else:
                turns.append((str(msg.get("role")), content))
        turns.append(("user", text))
        prompt_text, formatted = engine.format_conversation(turns, system)
        params = GenerationParams(max_tokens=int(max_tokens), temperature=temperature, top_p=top_p, seed=seed,
                                  stop=list(stop or []))
        try:
            result = engine.generate(prompt_text, prepared, params, formatted=formatted,
                                     on_delta=on_delta if (stream or on_delta) else None, cancel=cancel)
        except Cancelled:
            return Answer(text="", finish_reason="cancelled")
        images = [{**item, "file_id": ids[item["index"]]} for item in result.images]
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        return Answer(text=result.text, finish_reason=result.finish_reason, images=images, usage=usage,
                      timings_s=dict(result.timings_s))
