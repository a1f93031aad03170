# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import pytest
import torch

from radfm3d.data.structured_labels import STRUCTURES
from radfm3d.engine.pretraining import StructuredLoss, structured_metrics


def _labels(batch: int = 2) -> dict[str, torch.Tensor]:
    n = len(STRUCTURES)
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
            "structure_box": labels["structure_box"].clone(), "finding_present": (labels["finding_present"] * 2 - 1) * 50,
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


def test_patch_targets_mark_the_patches_holding_each_finding():
    from radfm3d.engine.pretraining import patch_targets

    boxes = torch.tensor([[[0.0, 0.0, 0.0, 0.1, 0.1, 0.1],     # small, in the first patch
                           [0.5, 0.5, 0.5, 0.76, 0.6, 0.6],    # 4% of it spills into x-patch 3: not counted
                           [0.2, 0.0, 0.0, 0.3, 0.1, 0.1],     # half in x-patch 0 (shared with slot 0), centre in 1
                           [0.0] * 6]])
    types = torch.tensor([[1, 3, 4, -100]])
    positive, kinds = patch_targets(boxes, types, (4, 4, 2))
    index = lambda i, j, k: (i * 4 + j) * 2 + k  # noqa: E731  (h w d) token order
    assert sorted(torch.nonzero(positive[0]).flatten().tolist()) == [index(0, 0, 0), index(1, 0, 0), index(2, 2, 1)]
    assert kinds[0, index(0, 0, 0)] == 1  # two findings in one patch: the first slot (the largest) wins
    assert kinds[0, index(1, 0, 0)] == 4
    assert kinds[0, index(2, 2, 1)] == 3
    assert (kinds[0][~positive[0]] == -100).all()


def _with_one_finding_and_patch_logits() -> tuple[dict, dict]:
    from radfm3d.data.structured_labels import MAX_FINDINGS

    labels = _labels()
    labels["findings_box"] = torch.zeros(2, MAX_FINDINGS, 6)
    labels["findings_box"][:, 0] = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.2, 0.3])
    labels["findings_type"] = torch.full((2, MAX_FINDINGS), -100)
    labels["findings_type"][:, 0] = 2
    pred = _perfect(labels)
    pred["patch_grid"] = torch.tensor([[4, 4, 2]] * 2)
    pred["patch_logits"] = torch.zeros(2, 32, 6)
    return labels, pred


def test_patch_objective_enters_the_loss_and_metrics():
    labels, pred = _with_one_finding_and_patch_logits()
    terms = StructuredLoss().terms(pred, labels)
    assert terms["patch_finding"] > 0 and "patch_type" in terms
    metrics = structured_metrics(pred, labels)
    assert metrics["patch_recall"] == 0.0


def test_patch_weight_zero_turns_the_patch_objective_off():
    labels, pred = _with_one_finding_and_patch_logits()
    assert not {"patch_finding", "patch_type"} & set(StructuredLoss(patch_weight=0).terms(pred, labels))
