# Copyright (c) radfm3d contributors. Apache-2.0.
"""Synthetic checkpoints with the official RadFM key tree, for tests and benchmarks (the real file is 50 GB and
cannot be downloaded here).

- :class:`RadFMDims`: RadFM's hyper-parameters (official values by default, ../shared/design/RADFM_CHECKPOINT.md
  §1.1) with :meth:`~RadFMDims.radfm3d_config` (the matching radfm3d config) and :meth:`~RadFMDims.llama_config`.
- :func:`radfm_tensor_specs`: every key of ``pytorch_model.bin`` (``lang_model.*`` + ``embedding_layer.*``, §2.2)
  with its shape and how it is initialised, including the modules unused at inference (BERT, DETR decoder,
  upsampler, heads), the stale buffers (``rotary_emb.inv_freq``, ``bert_model.embeddings.position_ids``) and the
  tied ``embedding_layer.weight`` (the same tensor as ``lang_model.model.embed_tokens.weight``).
- :func:`build_state_dict`: the whole state dict in memory (small dimensions; one generator, in key order).
- :func:`write_radfm_checkpoint`: a torch zip checkpoint written straight to disk tensor by tensor, never the whole
  model in memory (13B: 26 GB in bf16 with a peak RSS of about one vocabulary table). The file's header and pickle
  are written first with ``torch.serialization.skip_data`` (storages as sparse holes), then the file is memory-mapped
  shared (``torch.load(mmap=True)`` with ``MAP_SHARED``) and each tensor is filled in chunks and its pages dropped
  from the process (``madvise(MADV_DONTNEED)``; the data stays in the page cache and reaches the file).
  ``torch.load(..., weights_only=True)`` reads the result like any ``torch.save`` file.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["RadFMDims", "TensorSpec", "radfm_tensor_specs", "build_state_dict", "write_radfm_checkpoint"]


@dataclass
class RadFMDims:
    """RadFM hyper-parameters; defaults are the official RadFM-13B values."""

    patch: tuple[int, int, int] = (32, 32, 4)
    channels: int = 3
    vis_dim: int = 768
    pos_feats: int = 256  # x3 = vis_dim
    pos_table: tuple[int, int, int] = (16, 16, 128)
    vit_depth: int = 12
    vit_heads: int = 8
    vit_dim_head: int = 64  # inner 512 != vis_dim 768
    vit_mlp: int = 2048
    num_latents: int = 32
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    ff_mult: int = 4
    vocab: int = 32000
    hidden: int = 5120
    intermediate: int = 13824
    llm_layers: int = 40
    llm_heads: int = 40
    max_positions: int = 2048
    # modules unused at inference (shapes follow the same rules)
    bert_hidden: int = 768
    bert_layers: int = 12
    bert_vocab: int = 28895
    decoder_layers: int = 4

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch[0] * self.patch[1] * self.patch[2]

    @property
    def llm_head_dim(self) -> int:
        return self.hidden // self.llm_heads

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def llama_config(self) -> Any:
        """The stock transformers ``LlamaConfig`` of the language model (untied lm_head, BOS 1, EOS 2, PAD 0)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.llm_layers, num_attention_heads=self.llm_heads, num_key_value_heads=self.llm_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )

    def radfm3d_config(self) -> dict[str, Any]:
        """The matching radfm3d config (what ``convert_radfm`` / ``radfm3d convert-radfm --config`` is given)."""
        return {
            "vision_config": {
                "in_channels": self.channels, "patch_size": list(self.patch), "hidden_size": self.vis_dim,
                "depth": self.vit_depth, "num_heads": self.vit_heads, "dim_head": self.vit_dim_head,
                "mlp_dim": self.vit_mlp, "dropout": 0.1, "emb_dropout": 0.1, "patch_norm": True,
                "final_norm": False, "qkv_bias": False, "pos_table": list(self.pos_table),
                "pos_dims": [self.pos_feats] * 3,
            },
            "resampler_config": {"depth": self.perceiver_depth, "heads": self.perceiver_heads,
                                 "dim_head": self.perceiver_dim_head, "ff_mult": self.ff_mult},
            "num_image_tokens": self.num_latents,
            "projector_type": "linear",
            "text_config": {
                "model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.llm_layers,
                "num_attention_heads": self.llm_heads, "num_key_value_heads": self.llm_heads,
                "max_position_embeddings": self.max_positions, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            },
        }


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint entry. ``kind``: ``normal`` (``randn * scale + offset``), ``uniform`` ([0, 1)), ``inv_freq``
    (RoPE buffer of ``shape[0] * 2`` head dims), ``position_ids`` (``arange`` row), ``zeros``, ``ones``;
    ``tied_to``: the key whose tensor this entry is (same storage); ``integer``: int64 instead of float."""

    key: str
    shape: tuple[int, ...]
    kind: str = "normal"
    scale: float = 1.0
    offset: float = 0.0
    tied_to: str | None = None
    integer: bool = False
    decoder_linear: bool = False  # a decoder Linear of the LLM (``llm_std`` replaces its scale)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> list[TensorSpec]:
    specs = [TensorSpec(f"{prefix}.weight", (out_f, in_f), scale=in_f**-0.5)]
    if bias:
        specs.append(TensorSpec(f"{prefix}.bias", (out_f,), scale=0.02))
    return specs


def _norm(prefix: str, n: int) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (n,), scale=0.1, offset=1.0), TensorSpec(f"{prefix}.bias", (n,), scale=0.05)]


def radfm_tensor_specs(dims: RadFMDims | None = None) -> Iterator[TensorSpec]:
    """Every key of the official ``pytorch_model.bin`` at ``dims``, in a fixed order (LLM, vision side, unused)."""
    d = dims or RadFMDims()
    h, inter = d.hidden, d.intermediate
    # ---------------------------------------------------------------- language model (transformers 4.28 naming)
    yield TensorSpec("lang_model.model.embed_tokens.weight", (d.vocab, h), scale=0.5)
    for i in range(d.llm_layers):
        p = f"lang_model.model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield TensorSpec(f"{p}.self_attn.{name}.weight", (h, h), scale=h**-0.5, decoder_linear=True)
        yield TensorSpec(f"{p}.self_attn.rotary_emb.inv_freq", (d.llm_head_dim // 2,), kind="inv_freq")
        yield TensorSpec(f"{p}.mlp.gate_proj.weight", (inter, h), scale=h**-0.5, decoder_linear=True)
        yield TensorSpec(f"{p}.mlp.up_proj.weight", (inter, h), scale=h**-0.5, decoder_linear=True)
        yield TensorSpec(f"{p}.mlp.down_proj.weight", (h, inter), scale=inter**-0.5, decoder_linear=True)
        yield TensorSpec(f"{p}.input_layernorm.weight", (h,), scale=0.1, offset=1.0)
        yield TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), scale=0.1, offset=1.0)
    yield TensorSpec("lang_model.model.norm.weight", (h,), scale=0.1, offset=1.0)
    yield TensorSpec("lang_model.lm_head.weight", (d.vocab, h), scale=h**-0.5)
    # ---------------------------------------------------------------- embedding layer (vision side)
    e = "embedding_layer"
    yield TensorSpec(f"{e}.weight", (d.vocab, h), tied_to="lang_model.model.embed_tokens.weight")  # as in RadFM
    yield TensorSpec(f"{e}.figure_token_weight", (2, h), scale=0.5)
    v = f"{e}.vision_encoder"
    yield from _norm(f"{v}.to_patch_embedding.1", d.patch_dim)
    yield from _linear(f"{v}.to_patch_embedding.2", d.vis_dim, d.patch_dim)
    yield from _norm(f"{v}.to_patch_embedding.3", d.vis_dim)
    for name, rows in zip(("row_embed", "col_embed", "dep_embed"), d.pos_table):
        yield TensorSpec(f"{v}.pos_embedding.{name}.weight", (rows, d.pos_feats), kind="uniform")
    inner = d.vit_heads * d.vit_dim_head
    for i in range(d.vit_depth):
        p = f"{v}.transformer.layers.{i}"
        yield from _norm(f"{p}.0.norm", d.vis_dim)
        yield TensorSpec(f"{p}.0.fn.to_qkv.weight", (3 * inner, d.vis_dim), scale=d.vis_dim**-0.5)
        yield from _linear(f"{p}.0.fn.to_out.0", d.vis_dim, inner)
        yield from _norm(f"{p}.1.norm", d.vis_dim)
        yield from _linear(f"{p}.1.fn.net.0", d.vit_mlp, d.vis_dim)
        yield from _linear(f"{p}.1.fn.net.3", d.vis_dim, d.vit_mlp)
    pr = f"{e}.perceiver"
    yield TensorSpec(f"{pr}.latents", (d.num_latents, d.vis_dim))
    pinner = d.perceiver_heads * d.perceiver_dim_head
    for i in range(d.perceiver_depth):
        p = f"{pr}.layers.{i}"
        yield from _norm(f"{p}.0.norm_media", d.vis_dim)
        yield from _norm(f"{p}.0.norm_latents", d.vis_dim)
        yield from _linear(f"{p}.0.to_q", pinner, d.vis_dim, bias=False)
        yield from _linear(f"{p}.0.to_kv", 2 * pinner, d.vis_dim, bias=False)
        yield from _linear(f"{p}.0.to_out", d.vis_dim, pinner, bias=False)
        yield from _norm(f"{p}.1.0", d.vis_dim)
        yield from _linear(f"{p}.1.1", d.ff_mult * d.vis_dim, d.vis_dim, bias=False)
        yield from _linear(f"{p}.1.3", d.vis_dim, d.ff_mult * d.vis_dim, bias=False)
    yield from _norm(f"{pr}.norm", d.vis_dim)
    yield from _linear(f"{e}.fc", h, d.vis_dim)
    # ---------------------------------------------------------------- unused at inference
    bh = d.bert_hidden
    b = f"{e}.bert_model"
    yield TensorSpec(f"{b}.embeddings.word_embeddings.weight", (d.bert_vocab, bh))
    yield TensorSpec(f"{b}.embeddings.position_embeddings.weight", (16, bh))
    yield TensorSpec(f"{b}.embeddings.token_type_embeddings.weight", (2, bh))
    yield from _norm(f"{b}.embeddings.LayerNorm", bh)
    yield TensorSpec(f"{b}.embeddings.position_ids", (1, 16), kind="position_ids", integer=True)  # stale buffer
    for i in range(d.bert_layers):
        p = f"{b}.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            yield from _linear(f"{p}.attention.self.{name}", bh, bh)
        yield from _linear(f"{p}.attention.output.dense", bh, bh)
        yield from _norm(f"{p}.attention.output.LayerNorm", bh)
        yield from _linear(f"{p}.intermediate.dense", 4 * bh, bh)
        yield from _linear(f"{p}.output.dense", bh, 4 * bh)
        yield from _norm(f"{p}.output.LayerNorm", bh)
    yield from _linear(f"{b}.pooler.dense", bh, bh)
    yield from _linear(f"{e}.bert_projection_fc", d.vis_dim, d.vis_dim)
    vd = d.vis_dim
    yield TensorSpec(f"{e}.output_upscaling.0.weight", (vd, vd // 4, 2, 2, 2))
    yield TensorSpec(f"{e}.output_upscaling.0.bias", (vd // 4,))
    yield from _norm(f"{e}.output_upscaling.1", vd // 4)
    yield TensorSpec(f"{e}.output_upscaling.1.running_mean", (vd // 4,), kind="zeros")
    yield TensorSpec(f"{e}.output_upscaling.1.running_var", (vd // 4,), kind="ones")
    yield TensorSpec(f"{e}.output_upscaling.1.num_batches_tracked", (), kind="zeros", integer=True)
    yield TensorSpec(f"{e}.output_upscaling.3.weight", (vd // 4, vd // 8, 2, 2, 2))
    yield TensorSpec(f"{e}.output_upscaling.3.bias", (vd // 8,))
    for i in range(d.decoder_layers):
        p = f"{e}.transformer_decoder.layers.{i}"
        for att in ("self_attn", "multihead_attn"):
            yield TensorSpec(f"{p}.{att}.in_proj_weight", (3 * vd, vd))
            yield TensorSpec(f"{p}.{att}.in_proj_bias", (3 * vd,))
            yield from _linear(f"{p}.{att}.out_proj", vd, vd)
        yield from _linear(f"{p}.linear1", 2 * vd, vd)
        yield from _linear(f"{p}.linear2", vd, 2 * vd)
        for n in ("norm1", "norm2", "norm3"):
            yield from _norm(f"{p}.{n}", vd)
    yield from _norm(f"{e}.transformer_decoder.norm", vd)
    yield from _linear(f"{e}.transformer_decoder_mlp.0", vd // 4, vd)
    yield from _linear(f"{e}.transformer_decoder_mlp.2", vd // 8, vd // 4)
    yield from _linear(f"{e}.cls_head", 1, vd // 8)


def _deterministic(spec: TensorSpec) -> torch.Tensor | None:
    """The value of a non-random entry (buffers, constants), or ``None`` for a random one."""
    if spec.kind == "inv_freq":
        head_dim = 2 * spec.shape[0]
        return 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if spec.kind == "position_ids":
        return torch.arange(spec.shape[-1]).reshape(spec.shape)
    if spec.kind == "zeros":
        return torch.zeros(spec.shape, dtype=torch.int64 if spec.integer else torch.float32)
    if spec.kind == "ones":
        return torch.ones(spec.shape)
    return None


def _scale(spec: TensorSpec, llm_std: float | None) -> float:
    return llm_std if (llm_std is not None and spec.decoder_linear) else spec.scale


def build_state_dict(dims: RadFMDims | None = None, seed: int = 0, llm_std: float | None = None
                     ) -> dict[str, torch.Tensor]:
    """The official RadFM key tree at ``dims``, fp32, random (one generator in key order), in memory.

    ``llm_std``: standard deviation of the LLM's decoder Linears (e.g. 0.02, LLaMA's init) instead of
    ``in_features ** -0.5``."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for spec in radfm_tensor_specs(dims):
        if spec.tied_to is not None:
            sd[spec.key] = sd[spec.tied_to]  # the very same tensor object
            continue
        fixed = _deterministic(spec)
        if fixed is not None:
            sd[spec.key] = fixed
        elif spec.kind == "uniform":
            sd[spec.key] = torch.rand(spec.shape, generator=g)
        else:
            value = torch.randn(spec.shape, generator=g) * _scale(spec, llm_std)
            sd[spec.key] = value + spec.offset if spec.offset else value
    return sd


def _current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _release_pages(tensor: torch.Tensor) -> None:
    """Drop a tensor's pages of a shared file mapping from this process (the data stays in the page cache)."""
    from radfm3d.interop.radfm import _release_source_pages

    _release_source_pages(tensor)


def write_radfm_checkpoint(
    path: str | os.PathLike,
    dims: RadFMDims | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    llm_std: float | None = None,
    device: str | torch.device = "cpu",
    chunk_bytes: int = 64 * 2**20,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a RadFM-layout ``pytorch_model.bin`` at ``dims`` straight to disk (module docstring), atomically.

    Floating entries in ``dtype`` (the official file is fp32; bf16 halves the disk for a 13B benchmark), integer
    buffers int64. Random entries are drawn per tensor (generator seeded with ``seed`` and the entry's index) in
    chunks of ``chunk_bytes`` of fp32 on ``device`` (``"cuda"`` draws on the GPU, then copies). Returns
    ``{"path", "bytes", "tensors", "parameters", "seconds", "mb_per_s", "baseline_rss_bytes", "peak_rss_bytes",
    "peak_rss_bound_bytes"}``: ``peak_rss_bytes`` is this process's high-water mark (``VmHWM``) at the end, the bound
    ``baseline + largest tensor + one chunk + 32 MiB`` (the baseline is the RSS after the header is written)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from radfm3d.interop.radfm import peak_rss_bytes
    from radfm3d.utils import progress_bar

    started = time.perf_counter()
    path = Path(path)
    specs = list(radfm_tensor_specs(dims))
    with FakeTensorMode():  # shapes and dtypes only: no memory
        fake: dict[str, torch.Tensor] = {}
        for spec in specs:
            if spec.tied_to is not None:
                fake[spec.key] = fake[spec.tied_to]
            else:
                fake[spec.key] = torch.empty(spec.shape, dtype=torch.int64 if spec.integer else dtype)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(fake, partial)  # header + pickle; storage bytes left as holes
        del fake
        previous = torch.serialization.get_default_mmap_options()
        torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
        try:
            state = torch.load(partial, mmap=True, weights_only=True)
        finally:
            torch.serialization.set_default_mmap_options(previous)
        baseline = _current_rss()
        total = sum(state[s.key].nbytes for s in specs if s.tied_to is None)
        largest = max(state[s.key].nbytes for s in specs if s.tied_to is None)
        chunk_peak = min(chunk_bytes, max(s.numel for s in specs) * 4)
        bar = progress_bar(total, progress, unit="B", unit_scale=True, unit_divisor=1024, desc="write RadFM ckpt")
        chunk = max(1, chunk_bytes // 4)
        for index, spec in enumerate(specs):
            if spec.tied_to is not None:
                continue
            target = state[spec.key]
            fixed = _deterministic(spec)
            if fixed is not None:
                target.copy_(fixed)
            else:
                flat = target.view(-1)
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
                scale = _scale(spec, llm_std)
                for start in range(0, flat.numel(), chunk):
                    n = min(chunk, flat.numel() - start)
                    if spec.kind == "uniform":
                        values = torch.rand(n, generator=gen, device=device)
                    else:
                        values = torch.randn(n, generator=gen, device=device).mul_(scale)
                        if spec.offset:
                            values.add_(spec.offset)
                    flat[start:start + n].copy_(values)
            _release_pages(target)
            bar.update(target.nbytes)
        bar.close()
        del state
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    return {"path": str(path), "bytes": size, "tensors": len(specs),
            "parameters": sum(s.numel for s in specs if s.tied_to is None),
            "seconds": round(seconds, 3), "mb_per_s": round(size / 1e6 / max(seconds, 1e-9), 1),
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_bound_bytes": baseline + largest + chunk_peak + 32 * 2**20}
