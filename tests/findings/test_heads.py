# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radfm3d.errors import RadFM3DInputError
from radfm3d.findings.heads import StructuredFindingsHead, VisionPretrainingModel, read_head_file
from radfm3d.findings.schema import load_schema
from radfm3d.modeling.configuration import RadFM3DConfig
from radfm3d.modeling.model import RadFM3DForCausalLM


def test_phantom_head_shapes_match_the_shipped_layout(phantom_schema):
    head = StructuredFindingsHead(8, 4, phantom_schema, hidden=16)
    out = head(torch.randn(2, 4, 8))
    s, t = len(phantom_schema.structures), len(phantom_schema.finding_types)
    assert out["modality"].shape == (2, 3) and out["region"].shape == (2, 3) and out["total_count"].shape == (2, 4)
    assert out["structure_box"].shape == (2, s, 6) and out["finding_type"].shape == (2, s, t)
    assert out["finding_count"].shape == (2, s, 4) and out["finding_size"].shape == (2, s)
    # the shipped model's last layer: 3 + 3 + 4 + 13 * (1 + 6 + 1 + 4 + 5 + 6 + 1) = 322 rows
    assert head.net[-1].out_features == 322
    assert ((out["finding_box"] >= 0) & (out["finding_box"] <= 1)).all()


def test_head_sizes_follow_the_schema(flags_schema, structures_schema, phantom_schema):
    flags = StructuredFindingsHead(8, 4, flags_schema, hidden=16)
    assert set(flags(torch.randn(3, 4, 8))) == {"flags"} and flags.net[-1].out_features == len(flags_schema.flags)
    structures = StructuredFindingsHead(8, 4, structures_schema, hidden=16)
    assert set(structures(torch.randn(1, 4, 8))) == {"modality", "region", "structure_present", "structure_box"}
    with pytest.raises(ValueError, match="no finding boxes"):
        structures.finding_box_rows()
    data = phantom_schema.to_dict()
    data["max_count"] = 5
    data["modalities"] = data["modalities"][:2]
    head = StructuredFindingsHead(8, 4, load_schema(data), hidden=16)
    out = head(torch.randn(1, 4, 8))
    assert out["modality"].shape == (1, 2) and out["total_count"].shape == (1, 6)


def test_pretraining_model_reads_the_llm_input_latents_and_saves_a_full_model(tmp_path: Path, phantom_schema,
                                                                              flags_schema):
    torch.manual_seed(0)
    model = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny"))
    wrapper = VisionPretrainingModel(model, phantom_schema, hidden=16)
    pixels = torch.rand(2, 3, 32, 32, 8)
    out = wrapper(pixels)
    assert torch.allclose(wrapper.head(model.get_visual_latents(pixels))["modality"], out["modality"])
    folder = wrapper.save_pretrained(tmp_path / "stage0")
    assert (folder / "config.json").is_file() and (folder / "label_schema.json").is_file()
    assert set(read_head_file(folder / VisionPretrainingModel.head_file)) == {
        f"head.{k}" for k in wrapper.head.state_dict()}
    again = VisionPretrainingModel(RadFM3DForCausalLM.from_pretrained(folder), phantom_schema, hidden=16)
    again.load_head(folder)
    assert torch.equal(again.head.net[-1].weight, wrapper.head.net[-1].weight)
    with pytest.raises(RadFM3DInputError, match="do not fit"):
        VisionPretrainingModel(model, flags_schema, hidden=16).load_head_state(
            {f"head.{k}": v for k, v in wrapper.head.state_dict().items()})
