# Copyright (c) radfm3d contributors. Apache-2.0.
"""int8 and memory helpers for big checkpoints (the converted official RadFM-13B).

- CUDA: bitsandbytes LLM.int8 through transformers' ``BitsAndBytesConfig(load_in_8bit=True)`` on the stock LLaMA
  folder a conversion writes (:func:`bnb_int8_config`; pass it to ``LlamaForCausalLM.from_pretrained`` /
  ``radfm3d.modeling.llm.load_base_llm(..., quantization_config=...)``).
- CPU: PyTorch dynamic int8 quantisation of every ``nn.Linear`` of the LLM (:func:`quantize_llm_dynamic_int8`;
  int8 weights, activations quantised per batch at run time). ``torch.ao.quantization`` is deprecated upstream in
  favour of ``torchao`` but still shipped and working in torch 2.13; it needs fp32 weights.
- :func:`module_bytes` (what a loaded model really holds) and :func:`memory_table` (GPU memory needed for a config
  in bf16 / int8 / offloaded, from the parameter counts).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
from torch import nn

from radfm3d.errors import RadFM3DInputError

__all__ = ["bnb_int8_config", "quantize_llm_dynamic_int8", "module_bytes", "parameter_counts", "memory_table"]


def bnb_int8_config(**kwargs: Any) -> Any:
    """``BitsAndBytesConfig(load_in_8bit=True, **kwargs)`` for CUDA; raises with an install hint otherwise."""
    if not torch.cuda.is_available():
        raise RadFM3DInputError("int8", "bitsandbytes int8 needs a CUDA GPU; on CPU use quantize_llm_dynamic_int8()")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RadFM3DInputError("int8", "bitsandbytes is not installed: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, **kwargs)


def quantize_llm_dynamic_int8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), upcast: bool = False
                              ) -> nn.Module:
    """CPU int8: replace the ``nn.Linear`` layers of ``model.language_model`` (or of ``model`` itself when it has no
    ``language_model``) by dynamically quantised int8 Linears, in place; ``skip`` names kept in float (the
    ``lm_head`` by default, as bitsandbytes does). Weights must be fp32 (load with ``dtype=torch.float32``), or
    ``upcast=True``: a bf16/fp16 LLM is quantised one Linear at a time (each upcast to fp32 just before), then its
    remaining float weights (embeddings, norms, ``lm_head``) are made fp32, so the whole LLM never exists in fp32
    (a 2048-wide 4-layer LLaMA, 0.41 GB in bf16: peak RSS 0.79 GB above the baseline, against 1.27 GB through an
    fp32 load). Returns the model.
    """
    target = getattr(model, "language_model", model)
    dtypes = {p.dtype for p in target.parameters()}
    if dtypes != {torch.float32} and not upcast:
        raise RadFM3DInputError(
            "int8", f"dynamic int8 quantisation needs fp32 weights, the LLM holds {sorted(map(str, dtypes))} "
            "(or pass upcast=True)")
    names = [name for name, mod in target.named_modules()
             if isinstance(mod, nn.Linear) and not any(s in name.split(".") for s in skip)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notice (see module docstring)
        from torch.ao.quantization import quantize_dynamic

        if not upcast:
            quantize_dynamic(target, set(names), dtype=torch.qint8, inplace=True)
            return model
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            linear = getattr(parent, child).float()
            quantize_dynamic(parent, {child}, dtype=torch.qint8, inplace=True)
            # the swapped-out Linear lingers until a full garbage collection (a reference cycle); its fp32 weights
            # leave now (a gc.collect() per Linear would cost ~0.7 s each with a large model loaded)
            linear._parameters.clear()
    target.float()  # what stays in float: quantised Linears take and return fp32 activations
    return model


def module_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers a module holds, counting packed int8 weights of quantised Linears."""
    total = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())
                if t.device.type != "meta")
    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
    return int(total)


def parameter_counts(config: Any) -> dict[str, int]:
    """Parameters per part of a ``RadFM3DConfig`` (model built on the meta device: no memory):
    ``vision``, ``resampler``, ``projector``, ``extra``, ``llm_linear`` (decoder Linears), ``llm_embed``
    (input table), ``llm_head`` (lm_head), ``llm_other`` (norms)."""
    from radfm3d.modeling.model import RadFM3DForCausalLM

    with torch.device("meta"):
        model = RadFM3DForCausalLM(config)
    counts = {"vision": 0, "resampler": 0, "projector": 0, "extra": 0, "llm_linear": 0, "llm_embed": 0,
              "llm_head": 0, "llm_other": 0}
    parts = {"vision_model": "vision", "resampler": "resampler", "projector": "projector",
             "extra_token_embeddings": "extra"}
    for name, param in model.named_parameters():
        head = name.split(".")[0]
        if head in parts:
            counts[parts[head]] += param.numel()
        elif name.endswith("embed_tokens.weight"):
            counts["llm_embed"] += param.numel()
        elif "lm_head" in name:
            counts["llm_head"] += param.numel()
        elif param.ndim == 2:
            counts["llm_linear"] += param.numel()
        else:
            counts["llm_other"] += param.numel()
    return counts


def memory_table(config: Any, resident_layers: int = 0) -> list[dict[str, Any]]:
    """GPU memory (GB = 1e9 bytes) for the weights of ``config`` in each loading mode (activations and KV cache
    excluded; add ~1-3 GB for a 2k-token context at 13B). Rows: ``bf16``, ``int8`` (bitsandbytes: decoder Linears
    int8 + one fp16 scale per row, embeddings/lm_head/norms/vision in bf16), ``offload`` (vision + embeddings +
    lm_head on the GPU, ``resident_layers`` decoder layers on the GPU, the rest in CPU RAM/disk, streamed per layer:
    the GPU needs room for the resident part plus one layer)."""
    c = parameter_counts(config)
    text = config.text_config
    layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    per_layer = (c["llm_linear"] + c["llm_other"] - hidden) / layers  # the final norm belongs to no layer
    total = sum(c.values())
    # bitsandbytes LLM.int8: 1 byte per Linear weight + one fp16 scale per output row
    out_rows = layers * (4 * hidden + 2 * int(text.intermediate_size) + hidden)
    int8 = c["llm_linear"] + 2 * out_rows + 2 * (total - c["llm_linear"])
    always = total - c["llm_linear"] - c["llm_other"] + hidden  # vision side, embeddings, lm_head, final norm
    offload = 2 * always + 2 * per_layer * (resident_layers + 1)
    return [
        {"mode": "bf16", "gpu_bytes": int(2 * total), "note": "all weights on the GPU"},
        {"mode": "int8", "gpu_bytes": int(int8), "note": "bitsandbytes LLM.int8 decoder Linears, rest bf16"},
        {"mode": "offload", "gpu_bytes": int(offload),
         "note": f"{resident_layers} resident decoder layer(s) + one streamed layer; the rest on CPU RAM/disk"},
        {"mode": "per_layer_bf16", "gpu_bytes": int(2 * per_layer), "note": "one decoder layer in bf16"},
        {"mode": "parameters", "gpu_bytes": int(total), "note": "parameter count (not bytes)"},
    ]
