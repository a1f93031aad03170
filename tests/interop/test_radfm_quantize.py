# Copyright (c) radfm3d contributors. Apache-2.0.
"""Big-model paths on a converted synthetic RadFM checkpoint: CPU int8, CPU/disk offload of the stock LLaMA folder,
and the 13B memory table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from radfm_reference import TinyRadFMDims, build_state_dict  # noqa: E402

from radfm3d.interop.quantize import memory_table, module_bytes, quantize_llm_dynamic_int8  # noqa: E402
from radfm3d.interop.radfm import convert_radfm  # noqa: E402

DIMS = TinyRadFMDims(hidden=128, intermediate=352, llm_heads=4, llm_layers=2, vocab=256)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("radfm_q")
    state = build_state_dict(DIMS, seed=5)
    for key, value in state.items():  # LLaMA-like init scale for the decoder Linears
        if key.startswith("lang_model.model.layers.") and value.ndim == 2:
            value.normal_(0.0, 0.02)
    torch.save(state, folder / "pytorch_model.bin")
    convert_radfm(folder / "pytorch_model.bin", folder / "out", config=DIMS.radfm3d_config(), dtype="float32",
                  shard_size="200KB", progress=False)
    return folder / "out"


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    v, n = DIMS.vocab, DIMS.num_latents
    ids = torch.tensor([[1, 20, 21, v, *[v + 2] * n, v + 1, *range(30, 60)]])
    return ids, torch.rand(1, 1, 3, 16, 16, 4, generator=torch.Generator().manual_seed(0))


def test_cpu_dynamic_int8_shrinks_linears_and_keeps_logits_close(converted: Path) -> None:
    from radfm3d.modeling import RadFM3DForCausalLM

    model = RadFM3DForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ids, pixels = _inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
    linear_fp32 = sum(m.weight.numel() * 4 for n, m in model.language_model.named_modules()
                      if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    before = module_bytes(model.language_model)
    quantize_llm_dynamic_int8(model)
    after = module_bytes(model.language_model)
    assert before - after >= 0.7 * linear_fp32  # int8 = 1/4 of the fp32 Linear bytes (+ small scales)
    assert isinstance(model.language_model.lm_head, torch.nn.Linear)  # kept in float
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels).logits
    drift = float((out - ref).norm() / ref.norm())
    assert 0.0 < drift < 0.05, drift
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_cpu_int8_from_bf16_one_linear_at_a_time(converted: Path) -> None:
    """``upcast=True`` quantises a bf16-loaded LLM (each Linear upcast just before), ending as the fp32 path does:
    same int8 bytes, float parts in fp32, the same argmax."""
    from radfm3d.modeling import RadFM3DForCausalLM

    ids, pixels = _inputs()
    via_fp32 = quantize_llm_dynamic_int8(RadFM3DForCausalLM.from_pretrained(converted, dtype=torch.float32))
    via_bf16 = quantize_llm_dynamic_int8(RadFM3DForCausalLM.from_pretrained(converted, dtype=torch.bfloat16),
                                         upcast=True)
    assert module_bytes(via_bf16.language_model) == module_bytes(via_fp32.language_model)
    assert {p.dtype for p in via_bf16.language_model.parameters()} == {torch.float32}
    assert not any(isinstance(m, torch.nn.Linear) for n, m in via_bf16.language_model.named_modules()
                   if "lm_head" not in n)
    with torch.no_grad():
        a = via_fp32(input_ids=ids, pixel_values=pixels).logits
        b = via_bf16(input_ids=ids, pixel_values=pixels).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_int8_needs_fp32(converted: Path) -> None:
    from radfm3d.modeling import RadFM3DForCausalLM

    model = RadFM3DForCausalLM.from_pretrained(converted, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp32"):
        quantize_llm_dynamic_int8(model)


def test_llm_folder_offloads_to_disk_with_identical_logits(converted: Path, tmp_path: Path) -> None:
    """transformers' own big-model loading on the converted stock LLaMA folder: a CPU memory cap sends layers to
    disk (accelerate hooks stream them back per forward); logits are unchanged."""
    from transformers import LlamaForCausalLM

    folder = converted / "language_model"
    ids = torch.arange(3, 40).unsqueeze(0)
    full = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = full(ids).logits
    offloaded = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="auto",
                                                 max_memory={"cpu": "300KB"}, offload_folder=str(tmp_path))
    assert "disk" in set(map(str, offloaded.hf_device_map.values()))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, expected)


def test_device_map_auto_through_radfm3d(converted: Path) -> None:
    from radfm3d.modeling import RadFM3DForCausalLM

    model = RadFM3DForCausalLM.from_pretrained(converted, dtype=torch.bfloat16, device_map="auto")
    ids, pixels = _inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_memory_table_for_radfm_13b() -> None:
    from radfm3d.modeling import RadFM3DConfig

    rows = {r["mode"]: r["gpu_bytes"] for r in memory_table(RadFM3DConfig.from_preset("radfm-13b"))}
    assert rows["parameters"] == 13_123_827_456  # 13.27 B in the file minus ~143 M unused + 3 extra rows
    assert abs(rows["bf16"] / 1e9 - 26.25) < 0.01
    assert abs(rows["int8"] / 1e9 - 13.56) < 0.01
    assert 1.4e9 < rows["offload"] < 1.6e9 and abs(rows["per_layer_bf16"] / 1e9 - 0.634) < 0.001
