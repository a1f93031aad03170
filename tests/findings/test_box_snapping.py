# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radfm3d.findings.box_snapping import box_iou, snap_box, snap_text
from radfm3d.findings.model import RadFM3DFindingsModel, attach_reader
from radfm3d.modeling.model import RadFM3DForCausalLM
from radfm3d.processing import RadFM3DProcessor
from radfm3d.text.boxes import grid_box_to_normalised, parse_boxes


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


@pytest.mark.parametrize(("text", "expected", "used"), [
    ("<box>12,12,12,22,22,22</box>", "<box>10,10,10,20,20,20</box>", [0]),
    ("The mass: <box>22,22,22,12,12,12</box>.", "The mass: <box>10,10,10,20,20,20</box>.", [0]),  # corners swapped
    ("<box>1,1,1,39,39,41</box> and <box>58,61,59,69,72,68</box>",
     "<box>1,1,1,39,39,41</box> and <box>60,60,60,70,70,70</box>", [None, 1]),
    ("<box>1,2,3</box> no box", "<box>1,2,3</box> no box", []),  # malformed: left as written
    ("no box at all", "no box at all", []),
])
def test_snap_text_rewrites_well_formed_boxes(text, expected, used):
    assert snap_text(text, {"finding": FINDINGS, "structure": ORGANS}) == (expected, used)


def _snapping_model(tiny, phantom_schema, rigged_head, liver, shifts=None) -> RadFM3DFindingsModel:
    """The tiny model with a reader whose head reads region abdomen, every organ box the whole grid and the given
    unit finding box for the liver (others far away in a corner), whatever the image."""
    model, processor = tiny
    state = rigged_head(model, phantom_schema, region=2, findings={"liver": ("mass", 0.9)},
                        finding_boxes={"liver": liver})
    settings = {"num_tokens": 160, "head_hidden": 16, "snap_boxes": True,
                **({"test_time_shifts": shifts} if shifts else {})}
    return attach_reader(model, phantom_schema, state, processor.tokenizer, settings).eval()


@pytest.mark.parametrize("shifts", [None, [[4, 0, 0]]])
def test_generate_snaps_a_finding_box_onto_the_heads_box(tiny, phantom_schema, rigged_head, shifts):
    """The LLM writes a box near the liver's finding box: ``generate`` returns the head's box instead (averaged over
    the test-time shifts with each shift undone); a box outlining the whole grid (an organ) stays as written."""
    liver = [0.2, 0.3, 0.4, 0.4, 0.5, 0.6]
    snapping = _snapping_model(tiny, phantom_schema, rigged_head, liver, shifts)
    tokenizer = tiny[1].tokenizer
    ids = [snapping.config.image_token_id] * snapping.tokens_per_image + tokenizer.encode(
        " Locate the liver mass.", add_special_tokens=False)
    input_ids = torch.tensor([ids])
    pixels = torch.rand(1, 1, 3, 32, 32, 8)
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
    snapping.reader.settings["snap_boxes"] = False  # snapping off: the LLM's box as written
    assert answer_with(f"<box>{','.join(map(str, near))}</box>") == [tuple(near)]


def test_attach_turns_box_snapping_on_and_off(tiny, phantom_schema, rigged_head, flags_schema, tmp_path: Path):
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.findings.attach import attach_findings_prompt

    snapping = _snapping_model(tiny, phantom_schema, rigged_head, [0.2, 0.3, 0.4, 0.4, 0.5, 0.6])
    snapping.reader.settings["snap_boxes"] = False
    snapping.config.reader = dict(snapping.reader.settings)
    base = tmp_path / "base"
    snapping.save_pretrained(base)
    processor = RadFM3DProcessor.from_model_config("tiny")
    processor.num_image_tokens = snapping.tokens_per_image
    processor.save_pretrained(base)

    def reader_of(folder: Path):
        return RadFM3DForCausalLM.from_pretrained(folder, load_text_weights=False).reader

    on = attach_findings_prompt(base, tmp_path / "on", replace=True, snap_boxes=True)
    assert reader_of(on).snaps_boxes and "box_tokens" not in (on / "config.json").read_text()
    kept = attach_findings_prompt(on, tmp_path / "kept", replace=True, threshold=0.3)  # other changes keep it
    assert reader_of(kept).snaps_boxes and reader_of(kept).settings["threshold"] == 0.3
    off = attach_findings_prompt(on, tmp_path / "off", replace=True, snap_boxes=False)
    assert not reader_of(off).snaps_boxes
    with pytest.raises(RadFM3DInputError, match="finding boxes"):
        attach_findings_prompt(base, tmp_path / "x", replace=True, snap_boxes=True, schema=flags_schema.to_dict())
