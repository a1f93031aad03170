# Copyright (c) radfm3d contributors. Apache-2.0.
"""load_vision_tower: a CLIP tower initialises RadFM3DForCausalLM's vision_model and resampler, and the other way."""

from __future__ import annotations

import pytest
import torch

from radfm3d.contrastive import TINY_TEXT_CONFIG, RadFM3DCLIPModel, load_vision_tower
from radfm3d.errors import RadFM3DInputError
from radfm3d.modeling import RadFM3DConfig, RadFM3DForCausalLM


@pytest.fixture(scope="module")
def clip() -> RadFM3DCLIPModel:
    torch.manual_seed(1)
    model = RadFM3DCLIPModel.from_pretrained("tiny", load_text_weights=False, text_config=TINY_TEXT_CONFIG,
                                             projection_dim=16)
    with torch.no_grad():  # a tower that differs from any fresh initialisation
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model


def _causal_lm(**overrides) -> RadFM3DForCausalLM:
    torch.manual_seed(2)
    return RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny", **overrides)).eval()


def _clip_latents(clip: RadFM3DCLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    grid = clip.config.vision.grid(tuple(pixel_values.shape[-3:]))
    return clip.resampler(clip.vision_model(pixel_values), grid=grid)


@pytest.mark.parametrize("from_folder", [False, True])
def test_generative_model_sees_with_the_clip_tower(clip, tmp_path, from_folder):
    lm = _causal_lm()
    pixel_values = torch.rand(2, 3, 32, 32, 8)
    clip.eval()
    with torch.no_grad():
        want = _clip_latents(clip, pixel_values)
        assert not torch.allclose(lm.get_visual_latents(pixel_values), want)
        if from_folder:
            clip.save_pretrained(tmp_path)
        projector = {k: v.clone() for k, v in lm.projector.state_dict().items()}
        assert load_vision_tower(lm, tmp_path if from_folder else clip) is lm
        assert torch.equal(lm.get_visual_latents(pixel_values), want)
    assert all(torch.equal(v, lm.projector.state_dict()[k]) for k, v in projector.items())  # nothing else moved


def test_saved_generative_model_keeps_the_tower(clip, tmp_path):
    lm = load_vision_tower(_causal_lm(), clip)
    lm.save_pretrained(tmp_path)
    reloaded = RadFM3DForCausalLM.from_pretrained(tmp_path)
    pixel_values = torch.rand(1, 3, 32, 32, 8)
    with torch.no_grad():
        assert torch.allclose(reloaded.get_visual_latents(pixel_values), _clip_latents(clip.eval(), pixel_values))


def test_mismatching_configs_name_the_key(clip, tmp_path):
    tiny = RadFM3DConfig.from_preset("tiny")
    deeper = dict(tiny.vision_config, depth=3)
    with pytest.raises(RadFM3DInputError, match=r"vision_config\.depth differs"):
        load_vision_tower(_causal_lm(vision_config=deeper), clip)
    wider = dict(tiny.resampler_config, ff_mult=4)
    clip.save_pretrained(tmp_path)
    with pytest.raises(RadFM3DInputError, match=r"resampler_config\.ff_mult differs"):
        load_vision_tower(_causal_lm(resampler_config=wider), tmp_path)
    # dropout changes no weight: a tower trained with it fits a model without it
    load_vision_tower(_causal_lm(vision_config=dict(tiny.vision_config, dropout=0.1)), clip)
    with pytest.raises(RadFM3DInputError, match="not a vision-tower checkpoint folder"):
        load_vision_tower(_causal_lm(), tmp_path / "missing")


def test_build_model_with_vision_tower_is_the_bundle_knob(clip, tmp_path):
    from radfm3d.contrastive.transfer import build_model_with_vision_tower

    clip.save_pretrained(tmp_path / "clip")
    pixel_values = torch.rand(1, 3, 32, 32, 8)
    with_tower = build_model_with_vision_tower("tiny", seed=0, vision_tower=tmp_path / "clip",
                                               load_text_weights=False)
    plain = build_model_with_vision_tower("tiny", seed=0, vision_tower=None, load_text_weights=False)
    with torch.no_grad():
        want = _clip_latents(clip.eval(), pixel_values)
        assert torch.equal(with_tower.eval().get_visual_latents(pixel_values), want)
        assert not torch.allclose(plain.eval().get_visual_latents(pixel_values), want)
    from radfm3d.contrastive.transfer import TOWER_PREFIXES

    rest = {k: v for k, v in plain.state_dict().items() if not k.startswith(TOWER_PREFIXES)}
    assert all(torch.equal(v, with_tower.state_dict()[k]) for k, v in rest.items())  # build_model's, same seed
    with pytest.raises(RadFM3DInputError, match="not a vision-tower checkpoint folder"):
        build_model_with_vision_tower("tiny", vision_tower=tmp_path, load_text_weights=False)


@pytest.mark.parametrize("from_folder", [False, True])
def test_a_generative_tower_starts_a_clip_model(tmp_path, from_folder):
    from radfm3d.contrastive.training import build_clip_model

    lm = _causal_lm()
    with torch.no_grad():
        for param in list(lm.vision_model.parameters()) + list(lm.resampler.parameters()):
            param.add_(0.01 * torch.randn_like(param))
    if from_folder:
        lm.save_pretrained(tmp_path / "lm")
    pixel_values = torch.rand(2, 3, 32, 32, 8)
    clip = build_clip_model("tiny", seed=0, load_text_weights=False, text_config=TINY_TEXT_CONFIG, projection_dim=16,
                            vision_tower=tmp_path / "lm" if from_folder else lm).eval()
    fresh = build_clip_model("tiny", seed=0, load_text_weights=False, text_config=TINY_TEXT_CONFIG,
                             projection_dim=16).eval()
    with torch.no_grad():
        want = lm.get_visual_latents(pixel_values)
        assert torch.equal(_clip_latents(clip, pixel_values), want)
        assert not torch.allclose(_clip_latents(fresh, pixel_values), want)
    assert torch.equal(clip.visual_projection.weight, fresh.visual_projection.weight)  # the rest: the seeded preset


def test_a_source_without_tower_weights_is_named(tmp_path):
    from safetensors.torch import save_file

    lm = _causal_lm()
    lm.save_pretrained(tmp_path)
    save_file({"projector.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RadFM3DInputError, match=r"holds no vision_model\.\* weights"):
        load_vision_tower(RadFM3DCLIPModel.from_pretrained("tiny", load_text_weights=False,
                                                           text_config=TINY_TEXT_CONFIG), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RadFM3DInputError, match="unreadable safetensors"):
        load_vision_tower(_causal_lm(), tmp_path)
