# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

from pathlib import Path

import torch
from parameterized import parameterized

from radfm3d.modeling.heads import StructuredFindingsHead, VisionPretrainingModel


@parameterized.expand([(1, 8, 16, 13, 5), (3, 32, 24, 4, 2)])
def test_head_shapes(batch, tokens, dim, structures, types):
    head = StructuredFindingsHead(dim, tokens, structures, types, hidden=32)
    out = head(torch.randn(batch, tokens, dim))
    assert out["modality"].shape == (batch, 3) and out["region"].shape == (batch, 3)
    assert out["total_count"].shape == (batch, 4)
    assert out["structure_present"].shape == (batch, structures)
    assert out["structure_box"].shape == (batch, structures, 6)
    assert out["finding_type"].shape == (batch, structures, types)
    assert out["finding_count"].shape == (batch, structures, 4)
    assert out["finding_size"].shape == (batch, structures)
    assert 0 <= float(out["finding_box"].min()) and float(out["finding_box"].max()) <= 1


def test_pretraining_model_reads_the_llm_input_latents_and_saves_a_full_model(tmp_path: Path):
    from radfm3d.modeling.configuration import RadFM3DConfig
    from radfm3d.modeling.model import RadFM3DForCausalLM

    config = RadFM3DConfig.from_preset("tiny")
    model = RadFM3DForCausalLM(config).eval()
    wrapper = VisionPretrainingModel(model, hidden=16).eval()
    pixels = torch.rand(2, config.vision.in_channels, 32, 32, 8)  # the tiny preset's grid
    latents = wrapper.visual_latents(pixels)
    assert latents.shape == (2, config.num_image_tokens, config.vision.hidden_size)
    with torch.no_grad():
        projected = model.get_image_features(pixels)[:, 0]
        assert torch.allclose(model.projector(latents), projected, atol=1e-5)
    out = wrapper(pixels)
    assert out["modality"].shape == (2, 3)
    wrapper.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / VisionPretrainingModel.head_file).is_file()
    again = VisionPretrainingModel(RadFM3DForCausalLM.from_pretrained(tmp_path), hidden=16)
    again.load_head(tmp_path)
    for (k, a), (_, b) in zip(wrapper.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
