# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radfm3d.data.phantoms import FINDING_TYPES
from radfm3d.data.structured_labels import STRUCTURES
from radfm3d.modeling.box_snapping import BoxTokens, box_iou, build_box_tokens, snap_box
from radfm3d.modeling.configuration import RadFM3DConfig
from radfm3d.modeling.heads import VisionPretrainingModel
from radfm3d.modeling.model import RadFM3DForCausalLM
from radfm3d.processing import RadFM3DProcessor
from radfm3d.text.boxes import grid_box_to_normalised, parse_boxes

from test_findings_prompt import HIDDEN, _rigged_heads, _spec  # noqa: E402  (tests/modeling is on sys.path)

SHIPPED = Path(__file__).resolve().parents[2] / "bundles" / "radfm3d_demo" / "models" / "model"


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([0, 0, 0, 2, 2, 2], [0, 0, 0, 2, 2, 2], 1.0),
    ([0, 0, 0, 2, 2, 2], [2, 2, 2, 4, 4, 4], 0.0),  # touching faces
    ([0, 0, 0, 2, 2, 2], [1, 0, 0, 3, 2, 2], 4 / 12),
    ([0, 0, 0, 4, 4, 4], [1, 1, 1, 3, 3, 3], 8 / 64),  # one inside the other
])
def test_box_iou(a, b, expected):
    assert float(box_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))) == (
        pytest.approx(expected))


FINDINGS = [(10, 10, 10, 20, 20, 20), (60, 60, 60, 70, 70, 70)]
ORGANS = [(0, 0, 0, 40, 40, 40), (50, 50, 50, 90, 90, 90)]


@pytest.mark.parametrize(("llm", "expected", "used"), [
    ((12, 12, 12, 22, 22, 22), FINDINGS[0], 0),  # near the first finding: its box
    ((58, 61, 59, 69, 72, 68), FINDINGS[1], 1),
    ((1, 1, 1, 39, 39, 41), (1, 1, 1, 39, 39, 41), None),  # outlines an organ: kept
    ((95, 95, 95, 99, 99, 99), (95, 95, 95, 99, 99, 99), None),  # overlaps nothing: kept
])
def test_snap_box_takes_the_finding_box_that_overlaps_most(llm, expected, used):
    assert snap_box(llm, FINDINGS, ORGANS) == (tuple(expected), used)


def test_snap_box_without_candidates_keeps_the_box():
    assert snap_box((1, 2, 3, 4, 5, 6), [], []) == ((1, 2, 3, 4, 5, 6), None)


def _tokenizers() -> list:
    """The tiny preset's (one token per character) and the shipped demo model's SmolLM2 tokenizer (BPE, digits one
    by one)."""
    from transformers import AutoTokenizer

    return [RadFM3DProcessor.from_model_config("tiny").tokenizer, AutoTokenizer.from_pretrained(SHIPPED)]


@pytest.mark.parametrize("tokenizer", _tokenizers(), ids=lambda t: type(t).__name__)
@pytest.mark.parametrize("text", [
    "<box>3,45,7,60,99,12</box>",
    "The mass: <box>10,20,30,40,50,60</box>. Also <box>0,0,0,1,1,1</box>",
    "Liver.\n<box>5,5,5,9,9,9</box>",
])
def test_box_tokens_find_and_rewrite_boxes_in_token_ids(tokenizer, text):
    codec = BoxTokens(build_box_tokens(tokenizer))
    ids = tokenizer.encode(text, add_special_tokens=False)
    found = codec.find(ids)
    assert [box for _, _, box in found] == parse_boxes(text)
    new_boxes = [(1, 2, 3, 40, 55, 66 + k) for k in range(len(found))]
    rewritten = codec.rewrite(ids, [(start, end, box) for (start, end, _), box in zip(found, new_boxes)])
    assert parse_boxes(tokenizer.decode(rewritten)) == new_boxes


@pytest.mark.parametrize("text", ["<box>1,2,3,4,5</box>", "<box>1,2,3,4,5,100</box>", "<box>1,2,3,4,5,6",
                                  "box 1,2,3,4,5,6</box>"])
def test_box_tokens_leave_malformed_boxes_alone(text):
    tokenizer = RadFM3DProcessor.from_model_config("tiny").tokenizer
    assert BoxTokens(build_box_tokens(tokenizer)).find(tokenizer.encode(text, add_special_tokens=False)) == []


def test_a_tokenizer_that_merges_digits_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<", ">", "</", "box", ",", ".", *(str(v) for v in range(100))]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    with pytest.raises(ValueError, match="digit by digit"):
        build_box_tokens(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>"))


def _unit_logit(values) -> torch.Tensor:
    return torch.logit(torch.tensor(values, dtype=torch.float32))


def _snapping_model(model, processor, finding_boxes: dict, shifts=None) -> RadFM3DForCausalLM:
    """The tiny model with a findings prompt whose head reads region abdomen, every organ box the whole grid and
    the given unit finding boxes per structure name (others far away in a corner), whatever the image."""
    heads = _rigged_heads(model, 0, 2, FINDING_TYPES.index("mass"))
    bias = heads["head.net.4.bias"].clone()
    rows = VisionPretrainingModel(model, hidden=HIDDEN).head.finding_box_rows().reshape(len(STRUCTURES), 6)
    for s, name in enumerate(STRUCTURES):
        bias[rows[s]] = _unit_logit(finding_boxes.get(name, [0.9, 0.9, 0.9, 0.95, 0.95, 0.95]))
    heads["head.net.4.bias"] = bias
    spec = {**_spec(processor), "site_scores": "head", **({"test_time_shifts": shifts} if shifts else {}),
            "snap_boxes": True, "box_tokens": build_box_tokens(processor.tokenizer)}
    clone = RadFM3DForCausalLM(RadFM3DConfig.from_dict(model.config.to_dict()))
    clone.load_state_dict(model.state_dict())
    clone.add_findings_prompt(spec, heads)
    return clone.eval()


@pytest.mark.parametrize("shifts", [None, [[4, 0, 0]]])
def test_generate_snaps_a_finding_box_onto_the_heads_box(shifts):
    """The LLM writes a box near the liver's finding box: ``generate`` returns the head's box instead (averaged over
    the test-time shifts with each shift undone); a box outlining the whole grid (an organ) stays as written."""
    torch.manual_seed(0)
    model = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).eval()
    processor = RadFM3DProcessor.from_model_config("tiny")
    assert "liver" in STRUCTURES
    liver = [0.2, 0.3, 0.4, 0.4, 0.5, 0.6]
    snapping = _snapping_model(model, processor, {"liver": liver}, shifts)
    tokenizer = processor.tokenizer
    ids = [snapping.config.image_token_id] * snapping.tokens_per_image + tokenizer.encode(
        " Locate the liver mass.", add_special_tokens=False)
    input_ids = torch.tensor([ids])
    pixels = torch.rand(1, 1, model.config.vision.in_channels, 32, 32, 8)
    size = (32, 32, 8)
    expected_unit = torch.tensor(liver)
    if shifts:  # the shifted copy's box (the same, the head ignores the image) moved back by 4 voxels along H
        expected_unit = (expected_unit + expected_unit - torch.tensor([4 / 32, 0, 0] * 2)) / 2
    expected = grid_box_to_normalised((expected_unit * torch.tensor(size * 2, dtype=torch.float32)).tolist(), size)

    def answer_with(text: str) -> list:
        new = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        llm = snapping.language_model

        def fake_generate(input_ids, **kwargs):
            return torch.cat([input_ids, new], dim=1)

        original, llm.generate = llm.generate, fake_generate
        try:
            out = snapping.generate(input_ids, pixel_values=pixels, max_new_tokens=40)
        finally:
            llm.generate = original
        assert torch.equal(out[0, :input_ids.shape[1]], input_ids[0])
        return parse_boxes(tokenizer.decode(out[0, input_ids.shape[1]:]))

    near = grid_box_to_normalised([v * s + 1.5 for v, s in zip(liver, size * 2)], size)
    assert answer_with(f"<box>{','.join(map(str, near))}</box>") == [expected]
    assert answer_with("<box>0,0,0,99,99,99</box>") == [(0, 0, 0, 99, 99, 99)]
    # snapping off: the LLM's box as written
    snapping.findings_prompter.spec["snap_boxes"] = False
    assert answer_with(f"<box>{','.join(map(str, near))}</box>") == [tuple(near)]


def test_attach_turns_box_snapping_on_and_off(tmp_path: Path):
    from radfm3d.engine.pretraining import attach_findings_prompt

    torch.manual_seed(0)
    model = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).eval()
    processor = RadFM3DProcessor.from_model_config("tiny")
    base = tmp_path / "base"
    clone = _snapping_model(model, processor, {})
    clone.findings_prompter.spec.pop("snap_boxes")
    clone.config.findings_prompt = clone.findings_prompter.spec
    clone.save_pretrained(base)
    proc = RadFM3DProcessor.from_model_config("tiny")
    proc.num_image_tokens = clone.tokens_per_image
    proc.save_pretrained(base)

    def spec_of(folder: Path) -> dict:
        return RadFM3DForCausalLM.from_pretrained(folder, load_text_weights=False).config.findings_prompt

    on = attach_findings_prompt(base, tmp_path / "on", replace=True, snap_boxes=True)
    assert spec_of(on)["snap_boxes"] is True and spec_of(on)["box_tokens"] == build_box_tokens(processor.tokenizer)
    assert RadFM3DForCausalLM.from_pretrained(on, load_text_weights=False).findings_prompter.snaps_boxes
    kept = attach_findings_prompt(on, tmp_path / "kept", replace=True, threshold=0.3)  # other changes keep it
    assert spec_of(kept)["snap_boxes"] is True
    off = attach_findings_prompt(on, tmp_path / "off", replace=True, snap_boxes=False)
    assert "snap_boxes" not in spec_of(off) and "box_tokens" not in spec_of(off)
    from radfm3d.modeling.findings_prompt import check_reading_options

    with pytest.raises(ValueError, match="box_tokens"):
        check_reading_options({"snap_boxes": True})
