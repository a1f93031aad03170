# Copyright (c) radfm3d contributors. Apache-2.0.
"""Convert the official RadFM ``pytorch_model.bin`` (one ~50 GB fp32 torch pickle) into a radfm3d checkpoint folder.

Output folder (``radfm3d convert-radfm CHECKPOINT OUT``)::

    OUT/config.json                 RadFM3DConfig (radfm-13b preset or the given config); base LLM "language_model"
    OUT/model.safetensors           vision_model.*, resampler.*, projector.*, extra_token_embeddings.* (~108 M params)
    OUT/language_model/             a stock transformers LLaMA folder (sharded safetensors + index, config.json,
                                    generation_config.json with eos 2): ``LlamaForCausalLM.from_pretrained`` works on
                                    it, so transformers' own big-model loading (device_map, offload, int8) applies
    OUT/preprocessing.json          the RadFM preprocessing recipe (PreprocessingRecipe.radfm())
    OUT/processor_config.json       the RadFM3DProcessor (image-token strings, ids 32000-32002; with --tokenizer also
                                    tokenizer files made from RadFM's Language_files by load_radfm_tokenizer)
    OUT/conversion_report.json      kept / dropped keys, dtype, shards, seconds, MB/s, peak RSS

Memory: the checkpoint is memory-mapped (``torch.load(weights_only=True, mmap=True)``) and converted tensor by
tensor straight into the safetensors files (own streaming writer, no shard-sized buffer); the source pages of each
tensor are released after use (``madvise(MADV_DONTNEED)`` on the private, never-written file mapping). Peak RSS is
therefore bounded by ``process baseline + source bytes of the largest tensor + its converted copy`` (see
:func:`peak_rss_bound`), about 1.5 GB for RadFM-13B (largest tensor: the 32000x5120 fp32 vocabulary table, 655 MB),
far below the 50 GB file.

Key rules (../shared/design/RADFM_CHECKPOINT.md §2.2-2.3): every key maps or is explicitly dropped (unused BERT /
DETR decoder / upsampler / heads, stale buffers ``rotary_emb.inv_freq`` and ``position_ids``, the tied duplicate
``embedding_layer.weight``); an unknown key, a missing key or a shape mismatch is an error that names the key.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import mmap
import os
import pickle
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from radfm3d.utils import progress_bar, read_json_object, staged_folder
from radfm3d.errors import RadFM3DInputError

__all__ = [
    "RADFM_PRESET",
    "DROPPED_MODULES",
    "STALE_BUFFERS",
    "ConversionPlan",
    "ConversionResult",
    "load_radfm_state_dict",
    "load_radfm_tokenizer",
    "build_radfm_processor",
    "map_radfm_key",
    "plan_conversion",
    "convert_radfm",
    "write_safetensors",
    "peak_rss_bound",
    "peak_rss_bytes",
    "cli",
]

RADFM_PRESET = "radfm-13b"
LLM_SUBFOLDER = "language_model"
REPORT_NAME = "conversion_report.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1000**3

#: unused-at-inference modules of the official checkpoint: source prefix -> why it is dropped
DROPPED_MODULES: dict[str, str] = {
    "embedding_layer.bert_model.": "Med-KEBERT text encoder of the keyword-matching loss (unused at inference)",
    "embedding_layer.bert_projection_fc.": "keyword-matching projection (unused at inference)",
    "embedding_layer.transformer_decoder.": "4-layer DETR decoder of the keyword-matching loss (unused)",
    "embedding_layer.transformer_decoder_mlp.": "keyword-matching MLP (unused at inference)",
    "embedding_layer.output_upscaling.": "segmentation upsampler (unused at inference)",
    "embedding_layer.cls_head.": "keyword classification head (unused at inference)",
}
#: stale buffers persisted by old transformers versions: pattern -> why it is dropped
STALE_BUFFERS: dict[str, str] = {
    r"lang_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq": "stale RoPE buffer (recomputed by transformers)",
    r"embedding_layer\.bert_model\.embeddings\.position_ids": "stale BERT buffer",
}
_STALE_RES = [(re.compile(f"^{p}$"), why) for p, why in STALE_BUFFERS.items()]
#: duplicate keys of one tied tensor: dropped key -> the key it duplicates
TIED_DUPLICATES: dict[str, str] = {"embedding_layer.weight": "lang_model.model.embed_tokens.weight"}
FIGURE_TOKEN_KEY = "embedding_layer.figure_token_weight"
EXTRA_ROWS_KEY = "extra_token_embeddings.weight"

# (RadFM source prefix, radfm3d target prefix); "{i}" = a layer index; the rest of the key is kept verbatim
_PREFIX_RULES: list[tuple[str, str]] = [
    ("embedding_layer.vision_encoder.to_patch_embedding.1.", "vision_model.patch_embedding.norm_in."),
    ("embedding_layer.vision_encoder.to_patch_embedding.2.", "vision_model.patch_embedding.proj."),
    ("embedding_layer.vision_encoder.to_patch_embedding.3.", "vision_model.patch_embedding.norm_out."),
    ("embedding_layer.vision_encoder.pos_embedding.", "vision_model.pos_embedding."),
    ("embedding_layer.vision_encoder.transformer.layers.{i}.0.norm.", "vision_model.blocks.{i}.norm1."),
    ("embedding_layer.vision_encoder.transformer.layers.{i}.0.fn.to_qkv.", "vision_model.blocks.{i}.attn.qkv."),
    ("embedding_layer.vision_encoder.transformer.layers.{i}.0.fn.to_out.0.", "vision_model.blocks.{i}.attn.out_proj."),
    ("embedding_layer.vision_encoder.transformer.layers.{i}.1.norm.", "vision_model.blocks.{i}.norm2."),
    ("embedding_layer.vision_encoder.transformer.layers.{i}.1.fn.net.0.", "vision_model.blocks.{i}.mlp.linear1."),
    ("embedding_layer.vision_encoder.transformer.layers.{i}.1.fn.net.3.", "vision_model.blocks.{i}.mlp.linear2."),
    ("embedding_layer.perceiver.", "resampler."),
    ("embedding_layer.fc.", "projector."),
    ("lang_model.", "language_model."),
]


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"(?P<rest>.+)$")


_FORWARD = [(_compile(src), dst) for src, dst in _PREFIX_RULES]
_INVERSE = [(_compile(dst), src) for src, dst in _PREFIX_RULES]


def _rewrite(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            head = template.replace("{i}", match.group("i")) if "{i}" in template else template
            return head + match.group("rest")
    return None


def map_radfm_key(key: str) -> str | None:
    """RadFM key -> radfm3d key (``language_model.*`` for the LLM), or ``None`` when no rule applies.

    ``embedding_layer.vision_encoder.transformer.layers.3.0.fn.to_qkv.weight`` -> ``vision_model.blocks.3.attn.qkv.weight``;
    ``lang_model.model.norm.weight`` -> ``language_model.model.norm.weight``. (``figure_token_weight`` is not a
    one-to-one key: it fills rows of ``extra_token_embeddings.weight``.)"""
    return _rewrite(key, _FORWARD)


def radfm_key_for(target: str) -> str:
    """Inverse of :func:`map_radfm_key` (for error messages that name the RadFM key a model key needs)."""
    if target == EXTRA_ROWS_KEY:
        return FIGURE_TOKEN_KEY
    return _rewrite(target, _INVERSE) or target


def drop_reason(key: str) -> str | None:
    """Why a RadFM key is dropped (unused module, stale buffer, tied duplicate), or ``None`` if it must be kept."""
    for pattern, why in _STALE_RES:
        if pattern.match(key):
            return why
    for prefix, why in DROPPED_MODULES.items():
        if key.startswith(prefix):
            return why
    if key in TIED_DUPLICATES:
        return f"tied duplicate of {TIED_DUPLICATES[key]}"
    return None


# ============================================================================ loading
def load_radfm_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Memory-map a RadFM ``pytorch_model.bin`` with ``torch.load(weights_only=True, mmap=True)``.

    Raises ``RadFM3DInputError`` naming the file when it is missing, not a torch zip checkpoint, holds Python objects
    that ``weights_only`` refuses (arbitrary pickles are never executed), or is not a flat ``{str: Tensor}`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise RadFM3DInputError(path, "checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RadFM3DInputError(
            path,
            "refused: the pickle holds Python objects beyond tensors and plain containers, which weights_only "
            f"loading never executes; a RadFM checkpoint is a plain state dict ({first})",
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise RadFM3DInputError(
            path, f"not a readable torch zip checkpoint (legacy or damaged pickles cannot be memory-mapped): {err}"
        ) from None
    if not isinstance(state, Mapping):
        raise RadFM3DInputError(path, f"expected a state dict {{name: tensor}}, found a {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            hint = " (a training checkpoint? pass the model state dict)" if isinstance(value, Mapping) else ""
            raise RadFM3DInputError(
                path, f"expected a state dict {{name: tensor}}; entry {key!r} is a {type(value).__name__}{hint}"
            )
    return dict(state)


# ============================================================================ planning
@dataclass
class ConversionPlan:
    """What happens to every key. ``llm``/``own``: target key -> source key (``own`` for ``model.safetensors``);
    ``dropped``: source key -> reason; shapes/dtypes of the targets."""

    llm: dict[str, str] = field(default_factory=dict)
    own: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    target_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def kept_sources(self) -> list[str]:
        return list(self.own.values()) + list(self.llm.values())


def _resolve_config(config: Any) -> Any:
    from radfm3d.modeling.configuration import RadFM3DConfig

    if config is None:
        return RadFM3DConfig.from_preset(RADFM_PRESET)
    if isinstance(config, RadFM3DConfig):
        return config
    if isinstance(config, Mapping):
        data = {k: v for k, v in dict(config).items() if not str(k).startswith("_comment")}
        data.pop("model_type", None)
        return RadFM3DConfig(**data)
    return RadFM3DConfig.from_preset(config)


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """radfm3d state-dict key -> shape for ``config`` (model built on the meta device: no memory, ~0.3 s for 13B)."""
    from radfm3d.modeling.model import RadFM3DForCausalLM

    with torch.device("meta"):
        model = RadFM3DForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not config.tie_word_embeddings and not getattr(config.text_config, "tie_word_embeddings", False):
        return shapes
    shapes.pop("language_model.lm_head.weight", None)  # tied: saved once as the input embedding
    return shapes


def plan_conversion(state: Mapping[str, torch.Tensor], config: Any) -> ConversionPlan:
    """Map every RadFM key onto ``config``'s model; raise ``RadFM3DInputError`` naming unknown keys, missing keys
    (by their RadFM name) and shape mismatches, all at once."""
    config = _resolve_config(config)
    shapes = expected_shapes(config)
    plan = ConversionPlan(target_shapes=shapes)
    unknown: list[str] = []
    mismatched: list[str] = []
    for key, tensor in state.items():
        reason = drop_reason(key)
        if reason is not None:
            plan.dropped[key] = reason
            continue
        if key == FIGURE_TOKEN_KEY:
            plan.own[EXTRA_ROWS_KEY] = key
            rows, hidden = shapes[EXTRA_ROWS_KEY]
            if tuple(tensor.shape) != (2, hidden):
                mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} != expected (2, {hidden})")
            continue
        target = map_radfm_key(key)
        if target is None or target not in shapes:
            unknown.append(key)
            continue
        if tuple(tensor.shape) != shapes[target]:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} != expected {shapes[target]} ({target})")
        (plan.llm if target.startswith("language_model.") else plan.own)[target] = key
    for dup, original in TIED_DUPLICATES.items():
        if dup in state and original in state and not _same_tensor(state[dup], state[original]):
            mismatched.append(f"{dup}: expected to be tied to {original} (RadFM shares one parameter), but differs")
    missing = sorted(set(shapes) - set(plan.own) - set(plan.llm))
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s) (no mapping rule, not a known unused module): {unknown[:20]}")
    if missing:
        names = [radfm_key_for(k) for k in missing]
        problems.append(f"{len(missing)} missing key(s) the model needs: {names[:20]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape/tie mismatch(es): {mismatched[:20]}")
    if problems:
        raise RadFM3DInputError("RadFM checkpoint", "; ".join(problems))
    return plan


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset():
        return a.stride() == b.stride()
    return bool(torch.equal(a, b))


# ============================================================================ streaming safetensors writer
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: str | os.PathLike,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    after_write: Callable[[str], None] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor: the header (names, shapes, dtypes, offsets) is computed from
    ``entries`` first, then ``produce(name)`` is called for each entry in order and its bytes are written at once
    (then ``after_write(name)``), so at most one tensor is held in memory. Returns the file size in bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in entries:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            handle.write(memoryview(data))
            del tensor, data
            if after_write is not None:
                after_write(name)
            if on_bytes is not None:
                on_bytes(_nbytes(shape, dtype))
        handle.flush()
        os.fsync(handle.fileno())
    return 8 + len(raw) + offset


# ============================================================================ memory accounting
_MADV_DONTNEED = 4


def _release_source_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped source tensor from this process (``madvise(MADV_DONTNEED)``).

    Only called on storages of the private read-only-used file mapping made by ``torch.load(mmap=True)``: the pages
    are re-read from the file if touched again, so this changes RSS, never values. Linux only (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    if size < mmap.PAGESIZE:
        return
    aligned = start - start % mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(start + size - aligned), ctypes.c_int(_MADV_DONTNEED))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory so far (bytes).

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this address space. Not ``getrusage``'s
    ``ru_maxrss``, which survives ``exec``: a converter started from a large parent (a test runner that has loaded
    models) would report the parent's peak. Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_rss_bound(largest_source_bytes: int, largest_target_bytes: int, baseline_bytes: int) -> int:
    """The stated converter bound: ``baseline + largest source tensor + its converted copy + 256 MiB`` (allocator
    slack, header, metadata); ``baseline`` = RSS after imports and key planning, before any weight is read.
    For RadFM-13B: ~0.6 GB + 655 MB + 328 MB (bf16) -> ~1.9 GB, vs the 50 GB file."""
    return int(baseline_bytes + largest_source_bytes + largest_target_bytes + 256 * 2**20)


# ============================================================================ conversion
@dataclass
class ConversionResult:
    """Where the folder is and what the report says (the report is also ``OUT/conversion_report.json``)."""

    output: Path
    report: dict[str, Any]


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        value = dtype
    else:
        value = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(str(dtype).lower())
        value = value or getattr(torch, str(dtype).replace("torch.", ""), None)
    if value not in (torch.bfloat16, torch.float16, torch.float32):
        raise RadFM3DInputError("dtype", f"must be bfloat16, float16 or float32, got {dtype!r}")
    return value


def parse_size(size: int | str) -> int:
    """``2000000000``, ``"2GB"``, ``"500MB"``, ``"1GiB"`` -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(size).lower())
    if not match:
        raise RadFM3DInputError("shard_size", f"not a size: {size!r} (e.g. 2GB, 500MB)")
    unit = match.group(2).rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def _shard(entries: list[tuple[str, tuple[int, ...], torch.dtype]], limit: int) -> list[list[Any]]:
    shards: list[list[Any]] = [[]]
    used = 0
    for entry in entries:
        size = _nbytes(entry[1], entry[2])
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


#: RadFM forces these ids whatever its tokenizer_config.json says (Quick_demo/test.py; RADFM_CHECKPOINT.md §1.3)
RADFM_SPECIAL_IDS = {"unk_token": 0, "bos_token": 1, "eos_token": 2, "pad_token": 0}


def _read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object file ({} when absent), checked by :func:`radfm3d.utils.read_json_object`."""
    return read_json_object(path) if path.is_file() else {}


def load_radfm_tokenizer(folder: str | os.PathLike, model_max_length: int | None = None) -> Any:
    """RadFM's LLaMA tokenizer folder (``Quick_demo/Language_files``) -> a fast tokenizer with RadFM's ids.

    RadFM ships a sentencepiece ``tokenizer.model`` beside a ``tokenizer_config.json`` whose ``unk/bos/eos`` tokens
    are empty strings and an empty ``special_tokens_map.json``; transformers 5 recurses forever resolving ``""``.
    RadFM then forces ``pad 0, bos 1, eos 2`` (unk 0), so the special tokens here are the sentencepiece pieces at
    those ids, whatever the config says. The result encodes like ``sentencepiece`` itself (``[1] + sp.encode(t)``:
    BOS prepended, no EOS, a dummy ``▁`` prefix on every text segment, byte fallback): the ``LlamaTokenizer``
    conversion's vocabulary and merges are kept, its ``Metaspace`` pre-tokenizer (which does not add the dummy
    prefix before text that already starts with a space) is replaced by sentencepiece's own normalisation
    (``Prepend("▁")`` + ``Replace(" ", "▁")``). A folder without ``tokenizer.model`` (a fast ``tokenizer.json``)
    is loaded as it is, with the same forced ids.

    ``model_max_length``: the LLM's context (RadFM's config says 1e30, i.e. none).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    if not folder.is_dir():
        raise RadFM3DInputError(folder, "tokenizer folder not found")
    config = _read_json_file(folder / "tokenizer_config.json")
    _read_json_file(folder / "special_tokens_map.json")  # checked readable; RadFM's is {}
    sp_file = folder / "tokenizer.model"
    max_len = int(model_max_length) if model_max_length else None
    if sp_file.is_file():
        try:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(sp_file))
        except ImportError:  # pragma: no cover - sentencepiece is a dependency
            raise RadFM3DInputError(sp_file, "reading it needs `pip install sentencepiece`") from None
        except (OSError, RuntimeError) as err:
            raise RadFM3DInputError(sp_file, f"not a sentencepiece model ({err})") from None
        if sp.get_piece_size() <= max(RADFM_SPECIAL_IDS.values()):
            raise RadFM3DInputError(sp_file, f"only {sp.get_piece_size()} pieces")
        pieces = {name: sp.id_to_piece(i) for name, i in RADFM_SPECIAL_IDS.items()}
        try:
            llama = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, tokenizer_class="LlamaTokenizer", add_bos_token=True,
                add_eos_token=False, **{k: v for k, v in pieces.items() if k != "pad_token"})
        except (OSError, ValueError, TypeError, RecursionError, ImportError) as err:
            raise RadFM3DInputError(folder, f"cannot convert the sentencepiece tokenizer ({err})") from None
        from tokenizers import normalizers

        backend = llama.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **pieces,
                                            model_max_length=max_len or int(1e30))
        probe = tokenizer("a")["input_ids"]
        if not probe or probe[0] != RADFM_SPECIAL_IDS["bos_token"]:
            raise RadFM3DInputError(folder, f"the converted tokenizer does not prepend BOS 1 (gives {probe})")
    else:
        overrides = {k: None for k in ("unk_token", "bos_token", "eos_token") if config.get(k) == ""}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **overrides)
        except (OSError, ValueError, TypeError, RecursionError) as err:
            raise RadFM3DInputError(folder, f"not a tokenizer folder: {err}") from None
        if len(tokenizer) <= max(RADFM_SPECIAL_IDS.values()):
            raise RadFM3DInputError(folder, f"tokenizer has only {len(tokenizer)} tokens")
        for name, i in RADFM_SPECIAL_IDS.items():
            setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(i))
        if max_len:
            tokenizer.model_max_length = max_len
    return tokenizer


def build_radfm_processor(tokenizer_dir: str | os.PathLike, config: Any) -> Any:
    """RadFM's tokenizer folder (:func:`load_radfm_tokenizer`) -> a :class:`~radfm3d.processing.RadFM3DProcessor`
    with the ``radfm()`` preprocessing recipe, whose three image tokens (start, end, pad; added in that order) get
    the config's ids (``base_vocab_size + 0/1/2``: 32000-32002 for RadFM-13B). The tokenizer must have exactly the
    LLM's base vocabulary."""
    from radfm3d.processing import RadFM3DProcessor
    from radfm3d.transforms import PreprocessingRecipe

    tokenizer_dir = Path(tokenizer_dir)
    config = _resolve_config(config)
    context = getattr(config.text_config, "max_position_embeddings", None)
    tokenizer = load_radfm_tokenizer(tokenizer_dir, model_max_length=context)
    base = int(config.base_vocab_size)
    if len(tokenizer) != base:
        raise RadFM3DInputError(
            tokenizer_dir, f"tokenizer has {len(tokenizer)} tokens; the RadFM LLM's base vocabulary is {base} "
            "(give the original LLaMA tokenizer, without RadFM's added <image...> tokens)"
        )
    processor = RadFM3DProcessor(tokenizer, PreprocessingRecipe.radfm(), int(config.tokens_per_image))
    want = {"image_start_token_id": int(config.image_start_token_id),
            "image_end_token_id": int(config.image_end_token_id), "image_token_id": int(config.image_token_id)}
    if processor.image_token_ids != want:
        raise RadFM3DInputError(tokenizer_dir, f"added image tokens got ids {processor.image_token_ids}, the model "
                                f"config expects {want}")
    processor.check_config(config)
    return processor


def convert_radfm(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    config: Any = None,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    on_shard_written: Callable[[Path], None] | None = None,
) -> ConversionResult:
    """Convert the official RadFM ``pytorch_model.bin`` into a radfm3d checkpoint folder (layout: module docstring).

    ``config``: ``None`` (the ``radfm-13b`` preset), a preset name / JSON path, a dict or a ``RadFM3DConfig``.
    ``dtype``: of every floating tensor written (bf16 default). ``shard_size``: LLM shard limit (bytes or "2GB").
    Output is atomic: everything is written into a hidden ``.OUT.partial-<pid>`` and renamed at the end
    (:func:`~radfm3d.utils.staged_folder`); on any error the partial folder is removed. ``on_shard_written(path)`` is
    called after each weights file (progress hooks).
    """
    started = time.perf_counter()
    source = Path(checkpoint)
    out = Path(output).absolute()
    dtype = _parse_dtype(dtype)
    limit = parse_size(shard_size)
    if out.exists() and not overwrite:
        raise RadFM3DInputError(out, "output folder exists (pass overwrite=True / --overwrite to replace it)")
    config = _resolve_config(config)
    # the tokenizer is checked before any weight is read
    processor = build_radfm_processor(tokenizer, config) if tokenizer is not None else None
    state = load_radfm_state_dict(source)
    plan = plan_conversion(state, config)
    baseline_rss = _current_rss()  # interpreter + torch/transformers + the mapped key tree, before any weight is read

    def target_dtype(src: torch.Tensor) -> torch.dtype:
        return dtype if src.is_floating_point() else src.dtype

    own_entries = [(k, plan.target_shapes[k], target_dtype(state[s])) for k, s in plan.own.items()]
    llm_entries = [(k[len("language_model."):], plan.target_shapes[k], target_dtype(state[s]))
                   for k, s in plan.llm.items()]
    llm_source = {k[len("language_model."):]: s for k, s in plan.llm.items()}
    shards = _shard(llm_entries, limit)
    total = sum(_nbytes(s, d) for _, s, d in own_entries + llm_entries)
    largest_source = max(state[s].untyped_storage().nbytes() for s in plan.kept_sources())
    largest_target = max(_nbytes(s, d) for _, s, d in own_entries + llm_entries)

    bar = progress_bar(total, progress, unit="B", unit_scale=True, unit_divisor=1024, desc="convert-radfm")
    written_files: list[dict[str, Any]] = []
    with staged_folder(out) as partial, contextlib.closing(bar):
        (partial / LLM_SUBFOLDER).mkdir(parents=True)

        def produce_llm(name: str) -> torch.Tensor:
            src = state[llm_source[name]]
            return src.to(target_dtype(src))  # same dtype: the mapped tensor itself, written without a copy

        def release_llm(name: str) -> None:
            _release_source_pages(state[llm_source[name]])

        names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
                 if len(shards) > 1 else [WEIGHTS_NAME])
        weight_map: dict[str, str] = {}
        for name, entries in zip(names, shards):
            path = partial / LLM_SUBFOLDER / name
            size = write_safetensors(path, entries, produce_llm, {"format": "pt"}, bar.update, release_llm)
            weight_map.update({key: name for key, _, _ in entries})
            written_files.append({"file": f"{LLM_SUBFOLDER}/{name}", "bytes": size, "tensors": len(entries)})
            if on_shard_written is not None:
                on_shard_written(path)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(s, d) for _, s, d in llm_entries)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (partial / LLM_SUBFOLDER / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_llm_config(partial / LLM_SUBFOLDER, config, dtype)

        def produce_own(name: str) -> torch.Tensor:
            src = state[plan.own[name]]
            if name == EXTRA_ROWS_KEY:
                return _extra_rows(src, config, plan.target_shapes[name], target_dtype(src))
            return src.to(target_dtype(src))

        def release_own(name: str) -> None:
            _release_source_pages(state[plan.own[name]])

        path = partial / WEIGHTS_NAME
        size = write_safetensors(path, own_entries, produce_own, {"format": "pt", "radfm3d_with_base": "False"},
                                 bar.update, release_own)
        written_files.append({"file": WEIGHTS_NAME, "bytes": size, "tensors": len(own_entries)})
        if on_shard_written is not None:
            on_shard_written(path)
        bar.close()

        if processor is not None:
            processor.save_pretrained(partial)
            entries = {**processor.to_dict(), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                       "tokenizer": "."}
        else:
            entries = _processor_entries(config)
        (partial / PROCESSOR_CONFIG_NAME).write_text(json.dumps(entries, indent=2) + "\n")
        _write_recipe(partial)

        seconds = time.perf_counter() - started
        read_bytes = sum(state[s].nbytes for s in plan.kept_sources())
        report = {
            "source": str(source.absolute()),
            "source_bytes": source.stat().st_size,
            "dtype": str(dtype).replace("torch.", ""),
            "kept": {"tensors": len(plan.own) + len(plan.llm),
                     "parameters": sum(math.prod(s) for k, s in plan.target_shapes.items()),
                     "map": {**{v: k for k, v in plan.own.items()}, **{v: k for k, v in plan.llm.items()}}},
            "dropped": {"tensors": len(plan.dropped),
                        "parameters": sum(state[k].numel() for k in plan.dropped),
                        "by_reason": _group(plan.dropped), "keys": plan.dropped},
            "files": written_files,
            "written_bytes": sum(f["bytes"] for f in written_files),
            "seconds": round(seconds, 3),
            "read_mb_per_s": round(read_bytes / 1e6 / max(seconds, 1e-9), 1),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_bound_bytes": peak_rss_bound(largest_source, largest_target, baseline_rss),
            "baseline_rss_bytes": baseline_rss,
            "largest_tensor_bytes": {"source": largest_source, "target": largest_target},
        }
        config.text_model_name_or_path = LLM_SUBFOLDER  # relative: resolved inside the checkpoint folder
        config.architectures = ["RadFM3DForCausalLM"]
        config.save_pretrained(partial)  # config.json last among the model files: a partial folder never looks whole
        (partial / REPORT_NAME).write_text(json.dumps(report, indent=2))
        del state
    return ConversionResult(out, report)


def _processor_entries(config: Any) -> dict[str, Any]:
    """``processor_config.json`` of a conversion without a tokenizer: the processor's format and token ids, with
    ``"tokenizer": null`` (``RadFM3DProcessor.from_pretrained`` then asks for ``--tokenizer``)."""
    from radfm3d.processing import IMAGE_END_TOKEN, IMAGE_PAD_TOKEN, IMAGE_START_TOKEN, _FORMAT
    from radfm3d.text.prompts import IMAGE_PLACEHOLDER

    return {"format": _FORMAT, "version": 1, "processor_class": "RadFM3DProcessor",
            "num_image_tokens": int(config.tokens_per_image), "image_start_token": IMAGE_START_TOKEN,
            "image_end_token": IMAGE_END_TOKEN, "image_pad_token": IMAGE_PAD_TOKEN,
            "image_placeholder": IMAGE_PLACEHOLDER, "use_chat_template": False,
            "image_start_token_id": int(config.image_start_token_id),
            "image_end_token_id": int(config.image_end_token_id), "image_token_id": int(config.image_token_id),
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tokenizer": None}


def _extra_rows(figure: torch.Tensor, config: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``extra_token_embeddings`` rows: start/end = RadFM's ``figure_token_weight[0/1]``; the placeholder row (always
    overwritten by visual tokens) and any other row = 0."""
    rows = torch.zeros(shape, dtype=dtype)
    base = int(config.base_vocab_size)
    rows[int(config.image_start_token_id) - base] = figure[0].to(dtype)
    rows[int(config.image_end_token_id) - base] = figure[1].to(dtype)
    return rows


def _write_llm_config(folder: Path, config: Any, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    text_config = config.text_config
    text_config.dtype = dtype
    text_config.architectures = ["LlamaForCausalLM"] if text_config.model_type == "llama" else None
    text_config.save_pretrained(folder)
    # RadFM's tokenizer/training uses BOS 1, EOS 2, PAD 0 (the legacy config.json says eos 1): make EOS 2 the default
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(folder)


def _write_recipe(folder: Path) -> None:
    from radfm3d.transforms import PreprocessingRecipe

    PreprocessingRecipe.radfm().save(folder)


def _group(dropped: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in dropped.values():
        counts[why] = counts.get(why, 0) + 1
    return counts


def _current_rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return peak_rss_bytes()


# ============================================================================ CLI
def cli(argv: list[str] | None = None) -> int:
    """``radfm3d convert-radfm CHECKPOINT OUT [--tokenizer DIR] [--dtype bfloat16] [--config radfm-13b] ...``"""
    parser = argparse.ArgumentParser(
        prog="radfm3d convert-radfm",
        description="Convert the official RadFM pytorch_model.bin into a radfm3d checkpoint folder "
        "(sharded safetensors, config, processor files, preprocessing recipe, conversion report).",
    )
    parser.add_argument("checkpoint", help="the official pytorch_model.bin (loaded weights_only, memory-mapped)")
    parser.add_argument("output", help="output folder (written atomically)")
    parser.add_argument("--tokenizer", help="the RadFM/LLaMA tokenizer folder (Language_files); optional")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    parser.add_argument("--config", default=RADFM_PRESET, help="model preset name or JSON (default radfm-13b)")
    parser.add_argument("--shard-size", default="2GB", help="LLM shard size limit (default 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        result = convert_radfm(
            args.checkpoint, args.output, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype,
            shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except ValueError as err:  # RadFM3DInputError is a ValueError
        print(f"radfm3d convert-radfm: {err}", file=sys.stderr)
        return 2
    rep = result.report
    print(
        f"wrote {result.output}: {rep['kept']['tensors']} tensors ({rep['kept']['parameters'] / 1e9:.3f} B params) "
        f"in {rep['dtype']}, {len(rep['files'])} file(s), dropped {rep['dropped']['tensors']} "
        f"({rep['dropped']['parameters'] / 1e6:.1f} M params); {rep['seconds']:.1f} s, {rep['read_mb_per_s']} MB/s, "
        f"peak RSS {rep['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    return 0
