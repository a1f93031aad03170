# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from radfm3d.findings.box_refit import fit_finding_box_rows, refit_finding_boxes
from radfm3d.findings.heads import StructuredFindingsHead
from radfm3d.findings.schema import load_schema


def _schema(phantom_schema, structures: int, types: int, modalities: int, regions: int):
    data = phantom_schema.to_dict()
    data["structures"] = data["structures"][:structures]
    data["finding_types"] = data["finding_types"][:types]
    data["modalities"], data["regions"] = data["modalities"][:modalities], data["regions"][:regions]
    for s in data["structures"]:
        s["regions"] = [r["name"] for r in data["regions"]]
    data["finding_sites"] = {r["name"]: [[data["structures"][0]["name"], [data["finding_types"][0]["name"]]]]
                             for r in data["regions"]}
    return load_schema(data)


@pytest.mark.parametrize(("structures", "types", "modalities", "regions"), [(13, 5, 3, 3), (2, 1, 2, 3), (4, 3, 1, 1)])
def test_finding_box_rows_are_exactly_the_finding_box_outputs(phantom_schema, structures, types, modalities,
                                                              regions):
    head = StructuredFindingsHead(4, 2, _schema(phantom_schema, structures, types, modalities, regions),
                                  hidden=8).eval()
    rows = head.finding_box_rows()
    assert rows.shape == (structures * 6,)
    latents = torch.randn(3, 2, 4)
    before = head(latents)
    with torch.no_grad():
        head.net[-1].bias[rows] += torch.linspace(-1, 1, len(rows))
    after = head(latents)
    assert not torch.allclose(after["finding_box"], before["finding_box"])
    for key in before:
        if key != "finding_box":
            assert torch.equal(after[key], before[key]), key


def _box_data(n: int, generator: torch.Generator, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boxes of 2 structures that the rows can represent exactly: low faces sigmoid(h.t - 1), high sigmoid(h.t + 1)."""
    hidden = torch.randn(n, truth.shape[1], generator=generator)
    z = (hidden @ truth.T).reshape(n, 2, 3)
    return {"hidden": hidden, "finding_box": torch.sigmoid(torch.cat([z - 1, z + 1], -1)),
            "finding_mask": torch.ones(n, 2)}


def test_fit_finding_box_rows_learns_boxes_and_never_gets_worse_on_val():
    generator = torch.Generator().manual_seed(0)
    truth = 0.3 * torch.randn(6, 16, generator=generator)
    train, val = _box_data(512, generator, truth), _box_data(128, generator, truth)
    weight, bias = torch.zeros(12, 16), torch.zeros(12)
    new_weight, new_bias, report = fit_finding_box_rows(weight, bias, train, val, steps=300, learning_rate=3e-2,
                                                        batch_size=64, eval_every=50)
    assert report["before"]["val"]["hit@0.3"] < 0.5 < report["after"]["val"]["hit@0.3"]
    assert report["after"]["val"]["hit@0.3"] == max([report["before"]["val"]["hit@0.3"]]
                                                    + [h["val_hit@0.3"] for h in report["history"]])
    assert new_weight.shape == weight.shape and torch.equal(weight, torch.zeros(12, 16))  # inputs untouched
    # nothing to learn from (learning rate 0): the starting rows come back
    same_weight, same_bias, report = fit_finding_box_rows(new_weight, new_bias, train, val, steps=20, learning_rate=0)
    assert report["best_step"] == 0 and torch.equal(same_weight, new_weight) and torch.equal(same_bias, new_bias)


def test_refit_changes_only_the_finding_box_rows(structured_phantoms: Path, tmp_path: Path, phantom_schema):
    """End to end on a tiny findings model: the written model differs from the source in the finding-box
    rows of the head's last layer only, loads, and carries its report."""
    from safetensors.torch import load_file

    from radfm3d.cli import main
    from radfm3d.findings.attach import attach_findings_prompt
    from radfm3d.findings.heads import VisionPretrainingModel
    from radfm3d.modeling.configuration import RadFM3DConfig
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    torch.manual_seed(0)
    model = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny"))
    stage0 = tmp_path / "stage0"
    VisionPretrainingModel(model, phantom_schema).save_pretrained(stage0)
    processor = RadFM3DProcessor.from_model_config("tiny")
    processor.save_pretrained(stage0)
    source = attach_findings_prompt(stage0, tmp_path / "source", num_tokens=120)
    out = tmp_path / "refit"
    report = refit_finding_boxes(source, out, [(structured_phantoms, None)], (structured_phantoms, None),
                                 train_split=None,
                                 val_split=None, steps=30, learning_rate=1e-2, progress=False)
    assert report["train_images"] == report["val_images"] > 6  # 6 cases, some with a prior scan
    assert report["after"]["val"]["hit@0.3"] >= report["before"]["val"]["hit@0.3"]
    assert json.loads((out / "box_refit.json").read_text())["best_step"] == report["best_step"]
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    rows = RadFM3DForCausalLM.from_pretrained(out, load_text_weights=False).reader.head.finding_box_rows()
    last = "reader.head.net.4."
    for key in before:
        if key in (last + "weight", last + "bias"):
            keep = torch.ones(len(before[key]), dtype=torch.bool)
            keep[rows] = False
            assert torch.equal(before[key][keep], after[key][keep]), key
        else:
            assert torch.equal(before[key], after[key]), key
    if report["best_step"]:
        assert not torch.equal(before[last + "bias"][rows], after[last + "bias"][rows])
    # the CLI: a folder without a model is one line on stderr and exit code 2
    assert main(["refit-boxes", str(tmp_path / "nothing"), "--train", str(structured_phantoms), "--val",
                 str(structured_phantoms), "--out", str(tmp_path / "x")]) == 2
