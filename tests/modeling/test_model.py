# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadFM3DForCausalLM on the tiny preset (random 2-layer LLaMA): interleaving, loss, generation, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from radfm3d.modeling import RadFM3DConfig, RadFM3DForCausalLM

VOL = (32, 32, 8)


@pytest.fixture(scope="module")
def model() -> RadFM3DForCausalLM:
    torch.manual_seed(0)
    return RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).eval()


def image_span(cfg: RadFM3DConfig) -> list[int]:
    return [cfg.image_start_token_id] + [cfg.image_token_id] * cfg.num_image_tokens + [cfg.image_end_token_id]


def sample(cfg: RadFM3DConfig, pieces: list) -> torch.Tensor:
    """pieces: list of ints (text ids) or the string "img" -> one expanded image span."""
    ids: list[int] = []
    for piece in pieces:
        ids += image_span(cfg) if piece == "img" else [piece]
    return torch.tensor([ids])


def volumes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, n, 3, *VOL, generator=g)


# ----------------------------------------------------------------------------- interleaving
def test_visual_tokens_land_exactly_at_placeholders(model):
    cfg = model.config
    ids = sample(cfg, [1, 5, "img", 9, 10, "img", 11])
    px = volumes(2, 1)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, px)
        feats = model.get_image_features(px)  # (1, 2, N, hidden)
        text = model.embed_tokens(ids)
    assert feats.shape == (1, 2, cfg.num_image_tokens, cfg.text_config.hidden_size)
    pos = (ids[0] == cfg.image_token_id).nonzero().flatten()
    assert torch.equal(embeds[0, pos], feats[0].reshape(-1, feats.shape[-1]))
    other = ids[0] != cfg.image_token_id
    assert torch.equal(embeds[0, other], text[0, other])
    # start/end markers come from the model's own rows, base ids from the LLM's table
    start = (ids[0] == cfg.image_start_token_id).nonzero().flatten()
    assert torch.equal(embeds[0, start[0]], model.extra_token_embeddings.weight[0].detach())
    assert torch.equal(embeds[0, 1], model.language_model.get_input_embeddings().weight[5].detach())


def test_text_only_prompt_equals_bare_llm(model):
    ids = torch.tensor([[1, 7, 8, 9, 20, 33, 4]])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        bare = model.language_model(input_ids=ids).logits
    assert torch.equal(ours, bare)


def test_changing_one_image_changes_only_what_follows(model):
    cfg = model.config
    ids = sample(cfg, [1, 5, 6, "img", 9, 10, "img", 11, 12])
    px = volumes(2, 2)
    px2 = px.clone()
    px2[0, 1] = torch.rand(3, *VOL)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=px).logits
        b = model(input_ids=ids, pixel_values=px2).logits
    first_of_second = int((ids[0] == cfg.image_token_id).nonzero()[cfg.num_image_tokens])
    assert torch.equal(a[:, :first_of_second], b[:, :first_of_second])
    assert not torch.allclose(a[:, first_of_second], b[:, first_of_second])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_batch_mixing_one_and_two_images(model):
    cfg = model.config
    two = sample(cfg, [1, "img", 5, "img", 6, 7])
    one = sample(cfg, [1, 8, "img", 9])
    px_two, px_one = volumes(2, 3), volumes(1, 4)
    pad = two.shape[1] - one.shape[1]
    ids = torch.cat([two, torch.cat([torch.zeros(1, pad, dtype=torch.long), one], 1)])
    mask = torch.cat([torch.ones_like(two), torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(one)], 1)])
    garbage = torch.rand(1, 1, 3, *VOL)
    px = torch.cat([px_two, torch.cat([px_one, garbage], 1)])
    image_mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=px, image_mask=image_mask).logits
        alone_two = model(input_ids=two, pixel_values=px_two).logits
        alone_one = model(input_ids=one, pixel_values=px_one).logits
        px_other = px.clone()
        px_other[1, 1] = torch.rand(3, *VOL)  # the padded image slot is never encoded
        batch_other = model(input_ids=ids, attention_mask=mask, pixel_values=px_other, image_mask=image_mask).logits
        feats = model.get_image_features(px, image_mask)
    torch.testing.assert_close(batch[0], alone_two[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1, pad:], alone_one[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(batch, batch_other)
    assert torch.count_nonzero(feats[1, 1]) == 0


def test_placeholder_count_mismatch_is_a_clear_error(model):
    cfg = model.config
    ids = sample(cfg, [1, "img", 5])
    with pytest.raises(ValueError, match=r"sample 0: 8 placeholders for 2 image\(s\)"):
        model.embed_inputs(ids, volumes(2, 5))
    with pytest.raises(ValueError, match="no pixel_values"):
        model.embed_inputs(ids)
    with pytest.raises(ValueError, match="ids must lie in"):
        model.embed_inputs(torch.tensor([[1, cfg.total_vocab_size]]))


# ----------------------------------------------------------------------------- loss
def test_labels_loss_only_on_answer_tokens(model):
    cfg = model.config
    ids = sample(cfg, [1, "img", 5, 6, 40, 41, 2])
    px = volumes(1, 6)
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]  # answer "40 41 </s>"
    out = model(input_ids=ids, pixel_values=px, labels=labels)
    logits = out.logits.detach()
    ref = torch.nn.functional.cross_entropy(logits[0, -4:-1], ids[0, -3:])
    torch.testing.assert_close(out.loss.detach(), ref)
    # image-id labels (ids beyond the LLM vocabulary) are ignored, they never reach cross-entropy
    labels_img = labels.clone()
    labels_img[0, 1 : 3 + cfg.num_image_tokens] = ids[0, 1 : 3 + cfg.num_image_tokens]
    labels_img[0, 1 : 3 + cfg.num_image_tokens] = labels_img[0, 1 : 3 + cfg.num_image_tokens].clamp(min=cfg.base_vocab_size)
    torch.testing.assert_close(model(input_ids=ids, pixel_values=px, labels=labels_img).loss.detach(), ref)
    # gradients reach the vision encoder through the scattered tokens
    model.zero_grad()
    out.loss.backward()
    assert model.vision_model.patch_embedding.proj.weight.grad.abs().sum() > 0
    assert model.extra_token_embeddings.weight.grad[[0, 1]].abs().sum() > 0  # start / end rows
    model.zero_grad()


# ----------------------------------------------------------------------------- generation
def _greedy_by_hand(model, ids, px, steps):
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=seq, pixel_values=px).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def test_kv_cache_greedy_equals_no_cache(model):
    cfg = model.config
    ids = sample(cfg, [1, 5, "img", 9, 10])
    px = volumes(1, 7)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, min_new_tokens=6)
    cached = model.generate(ids, pixel_values=px, use_cache=True, **kw)
    uncached = model.generate(ids, pixel_values=px, use_cache=False, **kw)
    assert cached.shape == (1, ids.shape[1] + 6)
    assert torch.equal(cached[:, : ids.shape[1]], ids)  # prompt ids (image ids included) are returned as given
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, _greedy_by_hand(model, ids, px, 6))


def test_left_padded_batch_equals_one_by_one(model):
    cfg = model.config
    prompts = [sample(cfg, [1, "img", 5, 6, 7, 8, 9]), sample(cfg, [1, 11, "img", 12]), sample(cfg, [1, 3, 4])]
    images = [volumes(1, 8), volumes(1, 9), None]
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    singles = [model.generate(p, pixel_values=im, **kw)[0, p.shape[1]:] for p, im in zip(prompts, images)]
    length = max(p.shape[1] for p in prompts)
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - p.shape[1]:] = p[0]
        mask[i, length - p.shape[1]:] = 1
    px = torch.cat([images[0], images[1], torch.zeros_like(images[0])])
    image_mask = torch.tensor([[True], [True], [False]])
    out = model.generate(ids, attention_mask=mask, pixel_values=px, image_mask=image_mask, **kw)
    for i, single in enumerate(singles):
        assert torch.equal(out[i, length:], single), (i, out[i, length:], single)


def test_sampling_options_pass_through(model):
    cfg = model.config
    ids = sample(cfg, [1, "img", 5])
    px = volumes(1, 10)
    torch.manual_seed(3)
    a = model.generate(ids, pixel_values=px, do_sample=True, top_k=5, temperature=0.7, max_new_tokens=4,
                       repetition_penalty=1.3, eos_token_id=None)
    torch.manual_seed(3)
    b = model.generate(ids, pixel_values=px, do_sample=True, top_k=5, temperature=0.7, max_new_tokens=4,
                       repetition_penalty=1.3, eos_token_id=None)
    assert torch.equal(a, b) and a.shape[1] == ids.shape[1] + 4
    assert int(a[0, ids.shape[1]:].max()) < cfg.base_vocab_size  # image ids can never be generated


# ----------------------------------------------------------------------------- save / load
def test_save_load_roundtrip_bit_for_bit(model, tmp_path):
    cfg = model.config
    ids = sample(cfg, [1, 5, "img", 9, "img", 10])
    px = volumes(2, 11)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again = RadFM3DForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        out = again(input_ids=ids, pixel_values=px).logits
    assert torch.equal(out, ref)  # random tiny LLM (no named base) is saved with the checkpoint
    assert torch.equal(again.generate(ids, pixel_values=px, max_new_tokens=4, do_sample=False),
                       model.generate(ids, pixel_values=px, max_new_tokens=4, do_sample=False))
    half = RadFM3DForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(half(input_ids=ids, pixel_values=px).logits.float(), ref, rtol=0.1, atol=0.1)


def test_base_llm_named_relative_to_the_checkpoint(model, tmp_path):
    model.language_model.save_pretrained(tmp_path / "llm")  # e.g. a converted RadFM keeps its LLaMA in ./llm
    cfg = RadFM3DConfig.from_preset("tiny", text_model_name_or_path="llm")
    named = RadFM3DForCausalLM(cfg, language_model=model.language_model)
    named.load_state_dict(model.state_dict())
    named.save_pretrained(tmp_path)
    again = RadFM3DForCausalLM.from_pretrained(tmp_path)
    ids = sample(cfg, [1, "img", 5])
    px = volumes(1, 15)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, pixel_values=px).logits, model(input_ids=ids, pixel_values=px).logits)


def _save_with_named_base(model, tmp_path):
    """``model`` with its LLM saved to ``tmp_path/base-llm`` and named as the base; the checkpoint in ``ckpt``."""
    base_dir, ckpt = tmp_path / "base-llm", tmp_path / "ckpt"
    model.language_model.save_pretrained(base_dir)
    cfg = RadFM3DConfig.from_preset("tiny", text_model_name_or_path=str(base_dir))
    named = RadFM3DForCausalLM(cfg, language_model=model.language_model)
    named.load_state_dict(model.state_dict())
    named.eval()
    named.save_pretrained(ckpt)
    return named, cfg, base_dir, ckpt


def test_named_base_saves_only_trainable_parts_and_loads_strictly(model, tmp_path):
    named, cfg, base_dir, ckpt = _save_with_named_base(model, tmp_path)
    keys = load_file(ckpt / "model.safetensors").keys()
    assert not any(k.startswith("language_model.") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"vision_model", "resampler", "projector", "extra_token_embeddings"}
    assert json.loads((ckpt / "config.json").read_text())["text_model_name_or_path"] == str(base_dir)
    ids = sample(cfg, [1, "img", 5])
    px = volumes(1, 12)
    again = RadFM3DForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, pixel_values=px).logits, named(input_ids=ids, pixel_values=px).logits)
    # strictness: an unexpected and a missing key are both named
    state = load_file(ckpt / "model.safetensors")
    state["vision_model.surprise"] = torch.zeros(1)
    del state["projector.0.weight"]
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['projector.0.weight'\].*unexpected keys \['vision_model.surprise'\]"):
        RadFM3DForCausalLM.from_pretrained(ckpt)


def test_load_text_weights_false_keeps_the_visual_parts_and_the_base_name(model, tmp_path):
    import shutil

    named, _, base_dir, ckpt = _save_with_named_base(model, tmp_path)
    shutil.rmtree(base_dir)  # the base LLM's files are gone: a vision-only load must not need them
    with pytest.raises(ValueError, match="base-llm"):
        RadFM3DForCausalLM.from_pretrained(ckpt)
    vision_only = RadFM3DForCausalLM.from_pretrained(ckpt, load_text_weights=False)
    px = volumes(1, 12)
    with torch.no_grad():
        assert torch.equal(vision_only.get_image_features(px), named.get_image_features(px))
    assert not torch.equal(vision_only.language_model.lm_head.weight, named.language_model.lm_head.weight)
    vision_only.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["text_model_name_or_path"] == str(base_dir)


def test_lora_adapter_roundtrip(model, tmp_path):
    from peft import LoraConfig

    base_dir, ckpt = tmp_path / "base-llm", tmp_path / "ckpt"
    model.language_model.save_pretrained(base_dir)
    cfg = RadFM3DConfig.from_preset("tiny", text_model_name_or_path=str(base_dir))
    llm = type(model.language_model).from_pretrained(base_dir)
    torch.manual_seed(1)
    named = RadFM3DForCausalLM(cfg, language_model=llm).eval()
    named.add_lora(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in named.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    counts = named.freeze()
    assert 0 < counts["llm"] < sum(p.numel() for p in named.language_model.parameters())
    named.save_pretrained(ckpt)
    keys = load_file(ckpt / "model.safetensors").keys()
    assert any("lora_A" in k for k in keys) and not any(k.endswith("q_proj.base_layer.weight") for k in keys)
    ids = sample(cfg, [1, "img", 5, 6])
    px = volumes(1, 13)
    again = RadFM3DForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, pixel_values=px).logits, named(input_ids=ids, pixel_values=px).logits)


def test_freeze_and_gradient_checkpointing(tmp_path):
    torch.manual_seed(0)
    m = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).train()
    counts = m.freeze(vision=True, llm=True)
    assert counts["vision"] == 0 and counts["llm"] == 0 and counts["resampler"] > 0
    m.freeze(vision=False, llm=False)
    cfg = m.config
    ids = sample(cfg, [1, "img", 5, 6, 7])
    px = volumes(1, 14)
    labels = ids.masked_fill(ids >= cfg.base_vocab_size, -100)
    m(input_ids=ids, pixel_values=px, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_gradient_checkpointing(True)
    assert m.vision_model.gradient_checkpointing and m.resampler.gradient_checkpointing
    m(input_ids=ids, pixel_values=px, labels=labels).loss.backward()
    for n, p in m.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- refused requests and checkpoints
def test_generate_refuses_bad_lengths_before_any_compute(model):
    from radfm3d.errors import RadFM3DInputError

    cfg = model.config
    ids = sample(cfg, [1, "img", 5])
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for bad in (0, -3, 2.5):
            with pytest.raises(RadFM3DInputError, match="max_new_tokens"):
                model.generate(ids, pixel_values=volumes(1, 0), max_new_tokens=bad)
        limit = int(cfg.text_config.max_position_embeddings)
        new = limit - ids.shape[1] + 1
        with pytest.raises(RadFM3DInputError, match=rf"{ids.shape[1]} tokens after image-token expansion .*"
                                                    rf"max_new_tokens {new} = {limit + 1}.*context of {limit}"):
            model.generate(ids, pixel_values=volumes(1, 0), max_new_tokens=new)
    finally:
        hook.remove()
    assert calls == []  # refused before the encoder ran


def test_unknown_config_key_and_non_finite_weights_are_named(model, tmp_path):
    from radfm3d.errors import RadFM3DInputError

    model.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    bad = tmp_path / "typo"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "num_image_token": 8}))
    with pytest.raises(RadFM3DInputError, match="unknown config key 'num_image_token'"):
        RadFM3DForCausalLM.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**config, "projector_type": "conv"}))
    with pytest.raises(RadFM3DInputError, match="projector_type"):
        RadFM3DForCausalLM.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "os.system"}}))
    with pytest.raises(RadFM3DInputError, match="outside radfm3d"):
        RadFM3DForCausalLM.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(config))
    state = load_file(str(bad / "model.safetensors"))
    state["resampler.latents"] = state["resampler.latents"].clone()
    state["resampler.latents"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt", "radfm3d_with_base": "True"})
    with pytest.raises(RadFM3DInputError, match="'resampler.latents'.*NaN"):
        RadFM3DForCausalLM.from_pretrained(bad)
    with pytest.raises(ValueError, match="unknown config key 'colour'"):
        RadFM3DConfig.from_preset("tiny", colour=1)


def test_loading_prints_no_config_warnings(model, tmp_path):
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    model.save_pretrained(tmp_path)
    handler = Collect(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        RadFM3DForCausalLM.from_pretrained(tmp_path)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in messages if "model of type" in m]


def test_modeling_imports_no_higher_room():
    """The model room is the general VLM: no import of data, engine, evaluation or findings (static or lazy)."""
    import ast
    from pathlib import Path

    import radfm3d.modeling

    for path in Path(radfm3d.modeling.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("radfm3d.data", "radfm3d.engine", "radfm3d.evaluation",
                                            "radfm3d.findings")), f"{path.name} imports {name}"
