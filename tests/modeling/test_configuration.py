# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadFM3DConfig: presets, JSON round trip of the composite config, token-id contract, validation."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, LlamaConfig

from radfm3d.modeling import RadFM3DConfig, VisionConfig, list_presets


def test_presets_exist_and_are_consistent():
    assert {"tiny", "demo"} <= set(list_presets())
    demo = RadFM3DConfig.from_preset("demo")
    vision = demo.vision
    assert vision.grid((128, 128, 32)) == (8, 8, 8)  # 512 patch tokens
    assert demo.num_image_tokens == 32 == demo.resampler_config["num_latents"]
    assert demo.text_model_name_or_path == "smollm2-135m-instruct"
    assert demo.text_config.hidden_size == 576 and demo.projector_type == "mlp"
    tiny = RadFM3DConfig.from_preset("tiny")
    assert tiny.text_model_name_or_path is None and isinstance(tiny.text_config, LlamaConfig)
    assert tiny.vision.grid((32, 32, 8)) == (4, 4, 2)


def test_token_ids_default_above_base_vocab():
    cfg = RadFM3DConfig.from_preset("tiny")
    base = cfg.text_config.vocab_size
    assert cfg.base_vocab_size == base
    assert (cfg.image_start_token_id, cfg.image_end_token_id, cfg.image_token_id) == (base, base + 1, base + 2)
    assert cfg.num_extra_tokens == 3 and cfg.total_vocab_size == base + 3


def test_save_load_roundtrip(tmp_path):
    cfg = RadFM3DConfig.from_preset("tiny", num_extra_tokens=5)
    cfg.save_pretrained(tmp_path)
    again = RadFM3DConfig.from_pretrained(tmp_path)
    assert isinstance(again.text_config, LlamaConfig)
    assert again.text_config.to_dict() == cfg.text_config.to_dict()
    assert again.vision_config == cfg.vision_config and again.resampler_config == cfg.resampler_config
    assert again.num_extra_tokens == 5 and again.image_token_id == cfg.image_token_id
    assert VisionConfig.from_dict(again.vision_config) == cfg.vision
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RadFM3DConfig)
    assert RadFM3DConfig.from_preset(tmp_path).to_dict()["vision_config"] == cfg.vision_config


def test_named_base_llm_does_not_record_its_cache_folder(tmp_path):
    cfg = RadFM3DConfig.from_preset("tiny", text_model_name_or_path="smollm2-135m-instruct")
    cfg.text_config._name_or_path = "/home/someone/.cache/radfm3d/llm/smollm2-135m-instruct-0123"
    cfg.save_pretrained(tmp_path)
    assert ".cache" not in (tmp_path / "config.json").read_text()
    assert RadFM3DConfig.from_pretrained(tmp_path).text_model_name_or_path == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"image_token_id": 5}, "base_vocab_size"),
        ({"image_start_token_id": 130}, "distinct"),
        ({"projector_type": "conv"}, "projector_type"),
        ({"resampler_config": {"num_latents": 4}}, "num_image_tokens"),
        ({"num_extra_tokens": 2}, "fit"),
    ],
)
def test_invalid_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        RadFM3DConfig.from_preset("tiny", **overrides)


def test_unknown_preset_raises():
    with pytest.raises(FileNotFoundError, match="not a model preset"):
        RadFM3DConfig.from_preset("no-such-preset")
