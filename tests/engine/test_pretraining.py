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


def test_detector_objective_on_its_own_grid_enters_the_loss_and_metrics():
    labels, pred = _with_one_finding_and_patch_logits()
    pred["detector_grid"] = torch.tensor([[8, 8, 4]] * 2)
    pred["detector_logits"] = torch.full((2, 256, 6), -20.0)
    terms = StructuredLoss().terms(pred, labels)
    assert terms["detector_finding"] > 0 and "detector_type" in terms
    assert structured_metrics(pred, labels)["detector_recall"] == 0.0
    # the same finding fully detected: recall 1, and the detector term drops
    from radfm3d.engine.pretraining import patch_targets

    positive, types = patch_targets(labels["findings_box"], labels["findings_type"], (8, 8, 4))
    pred["detector_logits"][..., 0][positive] = 20.0
    pred["detector_logits"][..., 1:][positive] = torch.nn.functional.one_hot(types[positive], 5).float() * 40
    metrics = structured_metrics(pred, labels)
    assert metrics["detector_recall"] == 1.0 and metrics["detector_precision"] == 1.0
    assert StructuredLoss().terms(pred, labels)["detector_finding"] < 1e-3
    assert "detector_finding" not in StructuredLoss(detector_weight=0).terms(pred, labels)


def test_detector_only_stage_trains_only_the_detector_and_round_trips(tmp_path):
    """``build_pretraining_model(parts=[], detector=True, train_heads=False)``: encoder, resampler, LLM and heads
    frozen; the heads come from the model's findings prompt; the saved head file carries the detector and its config;
    ``attach_findings_prompt(replace=True)`` puts it under the model's findings prompt, LLM side untouched."""
    from safetensors.torch import load_file

    from radfm3d.engine.pretraining import attach_findings_prompt, build_pretraining_model
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.modeling.findings_prompt import build_findings_prompt_config
    from radfm3d.modeling.heads import VisionPretrainingModel, read_head_file
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    torch.manual_seed(0)
    processor = RadFM3DProcessor.from_model_config("tiny")
    model = RadFM3DForCausalLM.from_pretrained("tiny")
    heads = {k: v for k, v in VisionPretrainingModel(model).state_dict().items()
             if k.startswith(("head.", "patch_head."))}
    model.add_findings_prompt(build_findings_prompt_config(processor.tokenizer, num_tokens=160), heads)
    base = tmp_path / "prompted"
    model.save_pretrained(base)
    processor.num_image_tokens = model.tokens_per_image
    processor.save_pretrained(base)

    wrapper = build_pretraining_model(base, parts=[], detector={"channels": [4, 4, 4, 4]}, train_heads=False,
                                      load_text_weights=False)
    trainable = {name.split(".")[0] for name, p in wrapper.named_parameters() if p.requires_grad}
    assert trainable == {"detector"}
    assert torch.equal(wrapper.head.net[-1].weight, heads["head.net.4.weight"])  # the prompt's heads, not fresh ones
    out = wrapper(torch.rand(2, 3, 32, 32, 8))
    assert out["detector_logits"].shape == (2, 4 * 4 * 2, 6) and out["detector_grid"][0].tolist() == [4, 4, 2]

    stage = tmp_path / "detector_stage"
    wrapper.save_pretrained(stage)
    state, config = read_head_file(stage / VisionPretrainingModel.head_file)
    assert config["channels"] == [4, 4, 4, 4] and any(k.startswith("detector.") for k in state)
    resumed = build_pretraining_model(stage, parts=[], train_heads=False, load_text_weights=False)
    assert resumed.detector_config["channels"] == [4, 4, 4, 4]  # an earlier stage's detector keeps training
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in state.items())
    with pytest.raises(RadFM3DInputError, match="already has a findings prompt"):
        attach_findings_prompt(base, tmp_path / "x", heads_dir=stage)
    out_dir = attach_findings_prompt(base, tmp_path / "with_detector", heads_dir=stage, replace=True)
    again = RadFM3DForCausalLM.from_pretrained(out_dir, load_text_weights=False)
    assert again.config.findings_prompt["detector"]["channels"] == [4, 4, 4, 4]
    assert again.config.findings_prompt["num_tokens"] == 160
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out_dir / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # everything else unchanged
    assert sorted({k.split(".")[1] for k in set(after) - set(before)}) == ["detector"]
    # the reading now comes from the detector and needs the images
    pixels = torch.rand(1, 3, 32, 32, 8)
    assert len(again.read_findings(pixels)) == 1
    prompter = again.findings_prompter
    latents, tokens, grid = again.get_visual_latents(pixels, return_patch_tokens=True)
    with pytest.raises(ValueError, match="needs pixel_values"):
        prompter.read(latents, tokens, grid)
    again.train()
    assert not prompter.training and not prompter.detector.training  # batch-norm statistics stay frozen
    # replacing without a head file keeps the model's own heads and detector: a new threshold only
    rethresholded = attach_findings_prompt(out_dir, tmp_path / "threshold_only", replace=True, threshold=0.9)
    spec = RadFM3DForCausalLM.from_pretrained(rethresholded, load_text_weights=False).config.findings_prompt
    assert spec["threshold"] == 0.9 and spec["detector"]["channels"] == [4, 4, 4, 4]
    assert load_file(str(rethresholded / "model.safetensors")).keys() == after.keys()
    head_scores = attach_findings_prompt(base, tmp_path / "head_scores", replace=True, site_scores="head")
    spec = RadFM3DForCausalLM.from_pretrained(head_scores, load_text_weights=False).config.findings_prompt
    assert spec["site_scores"] == "head" and spec["threshold"] == model.config.findings_prompt["threshold"]


def _scan_with_findings(boxes: list[list[float]], types: list[int], size=(32, 32, 8)) -> dict:
    from radfm3d.data.structured_labels import IGNORE, MAX_FINDINGS

    findings_box = torch.zeros(MAX_FINDINGS, 6)
    findings_type = torch.full((MAX_FINDINGS,), IGNORE, dtype=torch.long)
    for slot, (box, kind) in enumerate(zip(boxes, types)):
        findings_box[slot], findings_type[slot] = torch.tensor(box), kind
    image = torch.arange(3 * size[0] * size[1] * size[2], dtype=torch.float32).reshape(3, *size)
    return {"image": image, "label": {"findings_box": findings_box, "findings_type": findings_type,
                                      "modality": torch.tensor(0)}, "id": "scan"}


@pytest.mark.parametrize("crop_size, align", [((16, 16, 4), (8, 8, 4)), ((8, 16, 8), (4, 4, 2)), ((32, 32, 8), (8, 8, 4))])
def test_finding_crops_cut_aligned_windows_and_move_the_boxes_with_them(crop_size, align):
    """Every crop is an aligned window of the scan (same voxels), its boxes are the scan's boxes in crop units, and
    a finding-centred crop holds its finding's cells (patch_targets on the crop = those cells of the whole scan)."""
    import numpy as np

    from radfm3d.engine.pretraining import FindingCrops, patch_targets

    item = _scan_with_findings([[0.55, 0.6, 0.5, 0.65, 0.7, 0.75]], [3])
    crops = FindingCrops(crop_size, num_samples=6, positive_fraction=1.0, align=align, jitter=(0, 0, 0))
    out = crops(item, np.random.default_rng(0))
    assert len(out) == 6
    full = torch.tensor([32.0, 32.0, 8.0])
    for crop in out:
        assert tuple(crop["image"].shape) == (3, *crop_size)
        corner = (crop["label"]["findings_box"][0, :3] * torch.tensor(crop_size) * -1
                  + item["label"]["findings_box"][0, :3] * full).round().long()
        assert all(int(c) % a == 0 for c, a in zip(corner, align))
        h, w, d = corner.tolist()
        assert torch.equal(crop["image"], item["image"][:, h:h + crop_size[0], w:w + crop_size[1], d:d + crop_size[2]])
        assert crop["label"]["modality"] is item["label"]["modality"]  # the rest of the label is kept
        cell_grid = [c // a for c, a in zip(crop_size, align)]
        positive, types = patch_targets(crop["label"]["findings_box"][None], crop["label"]["findings_type"][None],
                                        cell_grid)
        assert positive.any() and set(types[positive].tolist()) == {3}  # centred on the finding
        whole_positive, _ = patch_targets(item["label"]["findings_box"][None], item["label"]["findings_type"][None],
                                          [int(f) // a for f, a in zip(full.tolist(), align)])
        whole = whole_positive.reshape(*[int(f) // a for f, a in zip(full.tolist(), align)])
        ch, cw, cd = (c // a for c, a in zip(corner.tolist(), align))
        window = whole[ch:ch + cell_grid[0], cw:cw + cell_grid[1], cd:cd + cell_grid[2]]
        assert torch.equal(positive.reshape(*cell_grid), window)


def test_finding_crops_refuse_bad_sizes_and_place_crops_anywhere_without_findings():
    import numpy as np

    from radfm3d.engine.pretraining import FindingCrops

    with pytest.raises(ValueError, match="multiple of align"):
        FindingCrops((12, 16, 4))
    with pytest.raises(ValueError, match="larger than the image"):
        FindingCrops((64, 64, 16))(_scan_with_findings([], []), np.random.default_rng(0))
    corners = {tuple(c["image"][0, 0, 0, :1].tolist()) for c in
               FindingCrops((8, 8, 4), num_samples=40)(_scan_with_findings([], []), np.random.default_rng(1))}
    assert len(corners) > 5  # no finding: uniform placement


def test_finding_crop_dataset_draws_by_seed_epoch_and_index_and_the_sampler_passes_the_epoch():
    from radfm3d.engine.data import ResumableSampler
    from radfm3d.engine.pretraining import FindingCropDataset, FindingCrops

    items = [_scan_with_findings([[0.1, 0.1, 0.1, 0.3, 0.3, 0.3], [0.6, 0.6, 0.5, 0.8, 0.8, 0.9]], [0, 1])] * 3
    crops = FindingCrops((16, 16, 4), num_samples=3, positive_fraction=0.5)

    def draw(dataset, index):
        return torch.stack([c["image"] for c in dataset[index]])

    first, again = FindingCropDataset(items, None, crops, seed=5), FindingCropDataset(items, None, crops, seed=5)
    assert torch.equal(draw(first, 1), draw(again, 1)) and torch.equal(draw(first, 1), draw(first, 1))
    sampler = ResumableSampler(first, seed=0)
    sampler.set_epoch(3)
    assert first.epoch == 3  # the sampler tells the dataset
    epoch3 = [draw(first, i) for i in range(3)]
    assert any(not torch.equal(a, draw(again, i)) for i, a in enumerate(epoch3))  # epoch 0 draws other crops
    again.set_epoch(3)
    assert all(torch.equal(a, draw(again, i)) for i, a in enumerate(epoch3))


def test_detector_only_network_gets_only_the_detector_objective_and_metrics():
    from radfm3d.engine.pretraining import build_pretraining_model, patch_targets

    labels, _ = _with_one_finding_and_patch_logits()
    pred = {"detector_grid": torch.tensor([[8, 8, 4]] * 2), "detector_logits": torch.full((2, 256, 6), -20.0)}
    terms = StructuredLoss(detector_pos_weight=3.0).terms(pred, labels)
    assert set(terms) == {"detector_finding", "detector_type"}
    positive, _ = patch_targets(labels["findings_box"], labels["findings_type"], (8, 8, 4))
    weighted = torch.nn.functional.binary_cross_entropy_with_logits(
        pred["detector_logits"][..., 0], positive.float(), pos_weight=torch.tensor(3.0))
    assert terms["detector_finding"].item() == pytest.approx(2.0 * weighted.item(), rel=1e-5)
    metrics = structured_metrics(pred, labels)
    assert set(metrics) == {"detector_recall", "detector_precision", "detector_type_acc"}
    with pytest.raises(ValueError, match="detector_only trains only the finding detector"):
        build_pretraining_model("tiny", parts=["vision"], detector=True, train_heads=False, detector_only=True)
    wrapper = build_pretraining_model("tiny", parts=[], train_heads=False, detector_only=True,
                                      detector={"channels": [4, 4, 4, 4]}, load_text_weights=False)
    out = wrapper(torch.rand(2, 3, 16, 16, 4))  # a crop: smaller than the encoder's input grid
    assert set(out) == {"detector_logits", "detector_grid"} and out["detector_grid"][0].tolist() == [2, 2, 1]
