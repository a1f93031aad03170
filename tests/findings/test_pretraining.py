# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import pytest
import torch

import json
from pathlib import Path

from radfm3d.findings.pretraining import StructuredLoss, build_pretraining_model, build_structured_dataset, \
    structured_metrics

N_STRUCTURES = 13


def _labels(batch: int = 2) -> dict[str, torch.Tensor]:
    n = N_STRUCTURES
    present = torch.zeros(batch, n)
    present[:, :4] = 1
    finding = torch.zeros(batch, n)
    finding[:, 1] = 1
    box = torch.tensor([0.2, 0.2, 0.2, 0.6, 0.6, 0.6]).expand(batch, n, 6).clone()
    count = torch.where(present > 0, 0, -100).long()
    count[:, 1] = 1
    ftype = torch.full((batch, n), -100, dtype=torch.long)
    ftype[:, 1] = 2
    return {"modality": torch.tensor([0, 2])[:batch], "region": torch.tensor([1, 0])[:batch],
            "total_count": torch.ones(batch, dtype=torch.long), "structure_present": present,
            "structure_box": box, "structure_box_mask": present.clone(), "finding_present": finding,
            "finding_count": count, "finding_type": ftype, "finding_box": box.clone(), "finding_mask": finding,
            "finding_size": torch.zeros(batch, n)}


def _perfect(labels: dict[str, torch.Tensor], types: int = 5) -> dict[str, torch.Tensor]:
    def onehot(idx: torch.Tensor, k: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(idx.clamp_min(0), k).float() * 50
    return {"modality": onehot(labels["modality"], 3), "region": onehot(labels["region"], 3),
            "total_count": onehot(labels["total_count"], 4),
            "structure_present": (labels["structure_present"] * 2 - 1) * 50,
            "structure_box": labels["structure_box"].clone(),
            "finding_present": (labels["finding_present"] * 2 - 1) * 50,
            "finding_count": onehot(labels["finding_count"], 4), "finding_type": onehot(labels["finding_type"], types),
            "finding_box": labels["finding_box"].clone(), "finding_size": labels["finding_size"].clone()}


def test_perfect_prediction_has_near_zero_loss_and_full_metrics():
    labels = _labels()
    pred = _perfect(labels)
    assert StructuredLoss()(pred, labels).item() == pytest.approx(0.0, abs=1e-6)
    metrics = structured_metrics(pred, labels)
    for key in ("modality_acc", "region_acc", "finding_present_acc", "finding_type_acc", "structure_hit@0.3"):
        assert metrics[key] == 1.0, key
    assert metrics["structure_box_iou"] == pytest.approx(1.0)


def test_loss_only_counts_supervised_entries():
    labels = _labels()
    pred = _perfect(labels)
    pred["structure_box"][:, 10] = 0.0  # structure outside the region: masked, must not change the loss
    pred["finding_type"][:, 7] = torch.randn(2, 5)  # no finding there: ignored
    assert StructuredLoss()(pred, labels).item() == pytest.approx(0.0, abs=1e-6)
    pred["finding_box"][:, 1] = torch.tensor([0.3, 0.3, 0.3, 0.7, 0.7, 0.7])
    terms = StructuredLoss(box_weight=5.0).terms(pred, labels)
    assert terms["finding_box"].item() == pytest.approx(5.0 * 0.1, abs=1e-5)
    assert structured_metrics(pred, labels)["finding_box_iou"] < 1.0


def test_loss_gradients_reach_every_output():
    labels = _labels()
    pred = {k: v.clone().requires_grad_(True) for k, v in _perfect(labels).items()}
    for k in pred:
        pred[k].data += 0.1 * torch.randn_like(pred[k])
    StructuredLoss()(pred, labels).backward()
    for k, v in pred.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k


def test_flag_loss_and_metrics():
    labels = {"flags": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])}
    perfect = {"flags": (labels["flags"] * 2 - 1) * 50}
    assert StructuredLoss()(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert structured_metrics(perfect, labels) == {"flag_acc": 1.0}
    wrong = {"flags": -perfect["flags"]}
    assert StructuredLoss()(wrong, labels).item() > 10 and structured_metrics(wrong, labels)["flag_acc"] == 0.0


def _stage0(structured_phantoms: Path, schema, folder: Path, steps: int = 3) -> Path:
    """A few optimiser steps of stage 0 on the tiny preset under ``schema``; the exported folder with a processor."""
    from radfm3d.processing import RadFM3DProcessor

    wrapper = build_pretraining_model("tiny", schema, seed=0, head_hidden=16)
    processor = RadFM3DProcessor.from_model_config("tiny")
    dataset = build_structured_dataset(structured_phantoms, processor.recipe, folder / "cache", schema, split=None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)
    optimizer = torch.optim.Adam([p for p in wrapper.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = StructuredLoss()
    losses = []
    for _, batch in zip(range(steps), loader):
        loss = loss_fn(wrapper(batch["image"]), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    out = wrapper.save_pretrained(folder / "stage0")
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("name", ["phantom_flags", "phantom_structures"])
def test_second_schema_end_to_end(structured_phantoms: Path, tmp_path: Path, name, request):
    """Stage 0 under a CT-RATE-like flags schema (no structures, no boxes) or a structures-only schema (no findings),
    attaching the reader and generating a report on the tiny preset."""
    from radfm3d.cli import main
    from radfm3d.engine.training import load_processor, load_trained_model
    from radfm3d.findings.model import RadFM3DFindingsModel

    schema = request.getfixturevalue("flags_schema" if name == "phantom_flags" else "structures_schema")
    stage0 = _stage0(structured_phantoms, schema, tmp_path)
    assert json.loads((stage0 / "label_schema.json").read_text())["name"] == name
    out = tmp_path / "with_reader"
    assert main(["findings-prompt", str(stage0), "--out", str(out), "--num-tokens", "200"]) == 0
    model, processor = load_trained_model(out), load_processor(out)
    assert isinstance(model, RadFM3DFindingsModel) and model.reader.schema == schema
    case = json.loads(structured_phantoms.read_text().splitlines()[0])
    image = str(structured_phantoms.parent / case["images"]["image"])
    enc = processor(text=["<image> Write the radiology report."], images=[[image]], return_tensors="pt")
    enc.pop("grid_geometry", None)
    ids = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] == enc["input_ids"].shape[1] + 4
    reading = model.read_findings(enc["pixel_values"])[0][0]
    assert reading["text"].startswith("Image reading:") and reading["text"].endswith(".")
    assert ("flags" in reading) == (name == "phantom_flags")
    # stage 0 continues from the exported folder with its head
    again = build_pretraining_model(stage0, schema, head_hidden=16)
    saved = {k: v for k, v in again.head.state_dict().items()}
    from radfm3d.findings.heads import read_head_file

    stored = read_head_file(stage0 / "structured_head.safetensors")
    assert all(torch.equal(saved[k[len("head."):]], v) for k, v in stored.items())
