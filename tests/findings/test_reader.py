# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radfm3d.errors import RadFM3DInputError
from radfm3d.findings.model import RadFM3DFindingsModel, attach_reader
from radfm3d.findings.reader import parse_shifts, reader_settings, shifted_volume
from radfm3d.modeling.model import RadFM3DForCausalLM
from radfm3d.processing import RadFM3DProcessor

# the tiny preset's tokenizer writes one token per character, so a full reading needs ~100 slots
SETTINGS = {"num_tokens": 160, "threshold": 0.5, "head_hidden": 16}


def _inputs(model: RadFM3DFindingsModel, tokenizer, text: str) -> dict:
    ids = [model.config.image_token_id] * model.tokens_per_image + tokenizer.encode(text, add_special_tokens=False)
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.rand(1, 1, 3, 32, 32, 8)}


def _attach(tiny, schema, state, **settings) -> RadFM3DFindingsModel:
    model, processor = tiny
    return attach_reader(model, schema, state, processor.tokenizer, {**SETTINGS, **settings}).eval()


@pytest.mark.parametrize(("findings", "expected"), [
    ({}, "Image reading: CT, abdomen; no findings."),
    ({"liver": ("mass", 0.9)}, "Image reading: CT, abdomen; liver mass."),
    ({"liver": ("cyst", 0.7), "left_kidney": ("calcification", 0.95)},
     "Image reading: CT, abdomen; left kidney calcification, liver cyst."),
    ({"liver": ("mass", 0.3)}, "Image reading: CT, abdomen; no findings."),  # under the threshold
])
def test_reading_text_and_token_ids(tiny, phantom_schema, rigged_head, findings, expected):
    state = rigged_head(tiny[0], phantom_schema, modality=0, region=2, findings=findings)
    model = _attach(tiny, phantom_schema, state)
    pixels = torch.rand(1, 1, 3, 32, 32, 8)
    reading = model.read_findings(pixels)[0][0]
    assert reading["text"] == expected and reading["modality"] == "CT" and reading["region"] == "abdomen"
    ids = model.reader.token_ids(model.reader.read(model.get_visual_latents(pixels[:, 0])))[0].tolist()
    tokenizer = tiny[1].tokenizer
    assert tokenizer.decode(ids).strip() == expected
    assert len(ids) == SETTINGS["num_tokens"]


def test_long_reading_drops_the_weakest_findings_to_fit(tiny, phantom_schema, rigged_head):
    state = rigged_head(tiny[0], phantom_schema, region=2, findings={
        "liver": ("mass", 0.99), "spleen": ("cyst", 0.9), "right_kidney": ("cyst", 0.8)})
    model = _attach(tiny, phantom_schema, state, num_tokens=60)
    text = model.read_findings(torch.rand(1, 3, 32, 32, 8))[0][0]["text"]
    ids = model.reader.token_ids([model.reader.read(model.get_visual_latents(torch.rand(1, 3, 32, 32, 8)))[0]])
    assert ids.shape == (1, 60) and "liver mass" in tiny[1].tokenizer.decode(ids[0].tolist())
    assert "right kidney" in text  # the reading itself keeps everything; only the slots are cut


def test_flag_reading(tiny, flags_schema, rigged_head):
    state = rigged_head(tiny[0], flags_schema, flags={"lung_nodule": 0.9, "liver_cyst": 0.7, "brain_mass": 0.2})
    model = _attach(tiny, flags_schema, state)
    reading = model.read_findings(torch.rand(2, 3, 32, 32, 8))
    assert reading[0][0]["text"] == "Image reading: lung nodule, liver cyst."
    assert [f["flag"] for f in reading[1][0]["flags"]] == ["lung_nodule", "liver_cyst"]
    assert "modality" not in reading[0][0]


def test_structure_only_reading(tiny, structures_schema, rigged_head):
    state = rigged_head(tiny[0], structures_schema, modality=1, region=0)
    model = _attach(tiny, structures_schema, state)
    assert model.read_findings(torch.rand(1, 3, 32, 32, 8))[0][0]["text"] == "Image reading: MRI T1-weighted, head."


def test_findings_model_runs_saves_and_loads_as_its_class(tiny, phantom_schema, rigged_head, tmp_path: Path):
    state = rigged_head(tiny[0], phantom_schema, region=1, findings={"left_lung": ("nodule", 0.9)})
    model = _attach(tiny, phantom_schema, state, test_time_shifts="2,2,0")
    assert model.tokens_per_image == tiny[0].config.num_image_tokens + SETTINGS["num_tokens"]
    processor = RadFM3DProcessor.from_model_config("tiny")
    processor.num_image_tokens = model.tokens_per_image
    enc = _inputs(model, processor.tokenizer, " Describe.")
    logits = model(**enc).logits
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "label_schema.json").is_file()
    loaded = RadFM3DForCausalLM.from_pretrained(tmp_path / "m")  # auto_map: the findings class
    assert isinstance(loaded, RadFM3DFindingsModel) and loaded.reader.schema == phantom_schema
    assert loaded.reader.test_time_shifts == [[2, 2, 0]]
    assert torch.allclose(loaded(**enc).logits, logits, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.reader.parameters())


def test_one_encoder_pass_per_image_and_shift(tiny, phantom_schema, rigged_head):
    """generate (reading + snapping) and read_findings on the same images share the encoder outputs."""
    state = rigged_head(tiny[0], phantom_schema, region=2, findings={"liver": ("mass", 0.9)})
    model = _attach(tiny, phantom_schema, state, test_time_shifts=[[2, 2, 0], [-2, -2, 0]], snap_boxes=True)
    passes = []
    hook = model.vision_model.register_forward_hook(lambda *_: passes.append(1))
    enc = _inputs(model, tiny[1].tokenizer, " Locate the liver mass.")
    try:
        model.generate(**enc, max_new_tokens=3, do_sample=False)
        model.read_findings(enc["pixel_values"], enc.get("image_mask"))
        assert len(passes) == 3
        model.read_findings(torch.rand(1, 1, 3, 32, 32, 8))  # other images: encoded again
        assert len(passes) == 6
    finally:
        hook.remove()


@pytest.mark.parametrize(("text", "expected"), [
    ("2,2,0;-2,-2,0", [[2, 2, 0], [-2, -2, 0]]), ("none", []), (None, []), ([[1, 0, 0]], [[1, 0, 0]])])
def test_parse_shifts(text, expected):
    assert parse_shifts(text) == expected


@pytest.mark.parametrize("bad", ["1,2", "a,b,c", [[1.5, 0, 0]]])
def test_parse_shifts_refuses_what_is_not_three_whole_numbers(bad):
    with pytest.raises(ValueError, match="three whole"):
        parse_shifts(bad)


def test_reader_settings_are_checked():
    with pytest.raises(ValueError, match="unknown settings"):
        reader_settings({"treshold": 0.3})
    with pytest.raises(ValueError, match="snap_boxes"):
        reader_settings({"snap_boxes": "yes"})
    assert reader_settings({})["num_tokens"] == 24


@pytest.mark.parametrize("shift", [(2, 0, 0), (0, -3, 1), (1, 1, -1)])
def test_shifted_volume_moves_voxels_and_fills_the_border_with_zeros(shift):
    x = torch.arange(1, 1 + 2 * 6 * 5 * 4, dtype=torch.float32).reshape(1, 2, 6, 5, 4)
    out = shifted_volume(x, shift)
    dh, dw, dd = shift
    for h, w, d in [(3, 2, 2), (4, 1, 1)]:
        src = (h - dh, w - dw, d - dd)
        inside = all(0 <= v < n for v, n in zip(src, (6, 5, 4)))
        assert out[0, 1, h, w, d] == (x[0, 1, src[0], src[1], src[2]] if inside else 0)


def test_attaching_heads_of_another_schema_is_refused(tiny, phantom_schema, flags_schema, rigged_head):
    state = rigged_head(tiny[0], flags_schema)
    with pytest.raises(RadFM3DInputError, match="do not fit"):
        _attach(tiny, phantom_schema, state)
