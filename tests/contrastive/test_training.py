# Copyright (c) radfm3d contributors. Apache-2.0.
"""Contrastive pre-training on MONAI's SupervisedTrainer (radfm3d.contrastive.training).

Tiny preset + a tiny random BERT text tower (MiniLM's tokenizer) on a few tiny phantom cases and multi-series
studies: a short CPU run lowers the loss and lifts held-out retrieval above chance; a run stopped mid-epoch resumes
to the same weights as an uninterrupted one (feature queue and gradient accumulation included); a level with weight
0 is left out of the loss and still validated. Retrieval metrics are checked on hand-made embeddings.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events

from radfm3d.contrastive.configuration import TINY_TEXT_CONFIG



# ------------------------------------------------------------------------------------------ retrieval metrics
def test_retrieval_metrics_on_known_embeddings():
    from radfm3d.contrastive.training import retrieval_metrics

    eye = torch.eye(4)
    groups = torch.tensor([10, 11, 12, 13])
    perfect = retrieval_metrics(eye, eye, groups, groups, ks=(1, 2))
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 1.0
    assert perfect["i2t_r1_chance"] == pytest.approx(0.25) and perfect["i2t_r2_chance"] == pytest.approx(0.5)
    assert perfect["t2i_r1_chance"] == pytest.approx(0.25)

    # image 0 looks more like text 1 than like text 0 (and image 1 the other way): wrong at R@1, right at R@2
    crossed = eye.clone()
    crossed[0, :2] = torch.tensor([0.6, 0.8])
    crossed[1, :2] = torch.tensor([0.8, 0.6])
    swapped = retrieval_metrics(crossed, eye, groups, groups, ks=(1, 2))
    assert swapped["i2t_r1"] == pytest.approx(0.5) and swapped["i2t_r2"] == 1.0
    assert swapped["t2i_r1"] == pytest.approx(0.5)

    # a collapsed model (every embedding equal) scores the chance level, not a perfect one (ties at random)
    same = torch.ones(4, 3)
    collapsed = retrieval_metrics(same, same, groups, groups, ks=(1, 2))
    assert collapsed["i2t_r1"] == pytest.approx(0.25) and collapsed["i2t_r2"] == pytest.approx(0.5)
    assert collapsed["t2i_r1"] == pytest.approx(0.25)

    # identical reports count once: 3 images, 2 share one report text -> 2 unique reports
    img = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    grouped = retrieval_metrics(img, txt, torch.tensor([5, 5, 6]), torch.tensor([5, 5, 6]), ks=(1,))
    assert grouped["n_unique_reports"] == 2 and grouped["i2t_r1"] == 1.0 and grouped["t2i_r1"] == 1.0
    assert grouped["i2t_r1_chance"] == pytest.approx(0.5)
    # report 5 has 2 of 3 images: a random image is one of them with 2/3; report 6: 1/3
    assert grouped["t2i_r1_chance"] == pytest.approx((2 / 3 + 1 / 3) / 2)


# ------------------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """24 tiny phantom cases + 6 studies (CT, MR T1, MR T2); ``heldout.jsonl`` = the val and test splits."""
    from radfm3d.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("clip_training") / "phantoms"
    generate_phantoms(root, n=24, seed=0, grid=(32, 32, 8), matrix=(32, 40), slices=(8, 10), dicom_fraction=0.0,
                      prior_fraction=0.0, progress=False, studies=6)
    (root / "heldout.jsonl").write_text((root / "val.jsonl").read_text() + (root / "test.jsonl").read_text())
    return root


def _collate(phantoms: Path):
    from radfm3d.contrastive.data import ClipCollate
    from radfm3d.contrastive.training import load_clip_processor

    processor = load_clip_processor("tiny", phantoms / "preprocessing.json")
    return ClipCollate(processor.tokenizer, processor.recipe, image_cache_dir=phantoms.parent / "cache",
                       max_text_length=96)


def _trainer(phantoms: Path, out: Path, epochs: int, *, queue_size: int = 0, level_weights=None, handlers=(),
             accumulation_steps: int = 1, lr: float = 2e-3, save_interval: int = 0):
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler

    from radfm3d.contrastive.data import build_clip_dataset
    from radfm3d.contrastive.training import (ContrastiveInferer, OutputLoss, PrepareBatchCLIP,
                                              build_clip_model, build_training_module)
    from radfm3d.engine.data import build_dataloader
    from radfm3d.engine.handlers import TrainingCheckpointer
    from radfm3d.engine.training import build_optimizer, warmup_cosine_schedule

    model = build_clip_model("tiny", seed=0, load_text_weights=False, text_config=TINY_TEXT_CONFIG, projection_dim=32,
                             queue_size=queue_size, level_weights=level_weights)
    loader = build_dataloader(build_clip_dataset(phantoms / "train.jsonl"), batch_size=8,
                              collate_fn=_collate(phantoms), seed=0)
    module = build_training_module(model)
    optimizer = build_optimizer(module, lr=lr, weight_decay=0.01)
    schedule = warmup_cosine_schedule(optimizer, 2, len(loader) * epochs)
    checkpointer = TrainingCheckpointer(out / "checkpoints", module, optimizer, schedule, save_interval=save_interval)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=module, optimizer=optimizer,
        loss_function=OutputLoss(), inferer=ContrastiveInferer(), prepare_batch=PrepareBatchCLIP(),
        train_handlers=[LrScheduleHandler(schedule, print_lr=False), checkpointer, *handlers],
        accumulation_steps=accumulation_steps, decollate=False)
    return trainer, module


def _validation(phantoms: Path, interval: int = 100):
    from radfm3d.contrastive.data import build_clip_dataset
    from radfm3d.contrastive.training import ContrastiveValidation

    loader = torch.utils.data.DataLoader(build_clip_dataset(phantoms / "heldout.jsonl"), batch_size=8,
                                         collate_fn=_collate(phantoms))
    return ContrastiveValidation(loader, interval=interval)


def _record_losses(trainer) -> list[dict[str, float]]:
    from radfm3d.contrastive.training import loss_terms_of

    losses: list[dict[str, float]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(loss_terms_of(e.state.output)))
    return losses


def test_short_run_lowers_the_loss_and_lifts_heldout_retrieval(phantoms: Path, tmp_path: Path):
    validation = _validation(phantoms)
    trainer, module = _trainer(phantoms, tmp_path, epochs=12, handlers=[validation])
    losses = _record_losses(trainer)
    before = validation.evaluate(module, "cpu")
    trainer.run()
    after = validation.last
    per_epoch = len(losses) // 12
    first = np.mean([x["loss"] for x in losses[:per_epoch]])
    last = np.mean([x["loss"] for x in losses[-per_epoch:]])
    assert {"loss_scan", "loss_structure", "loss_study"} <= set().union(*losses)  # every level trained
    assert last < 0.7 * first, (first, last)
    # held-out structure sentences <-> the patch tokens in their boxes (30+ unique sentences, chance ~0.03) is the
    # level with enough pairs to generalise at this size (a few dozen reports: the scan and study terms overfit)
    assert after["val_loss_structure"] < before["val_loss_structure"]
    for way in ("i2t", "t2i"):
        chance = after[f"val_structure_{way}_r1_chance"]
        assert chance < 0.1
        assert after[f"val_structure_{way}_r1"] > 2 * chance, (way, after[f"val_structure_{way}_r1"], chance)
        assert before[f"val_structure_{way}_r1"] < after[f"val_structure_{way}_r1"]
    for key in ("val_i2t_r1", "val_t2i_r5", "val_study_i2t_r1"):  # the scan and study levels are reported too
        assert math.isfinite(after[key])


def test_stopped_run_resumes_to_the_same_weights(phantoms: Path, tmp_path: Path):
    """Feature queue on, 2 accumulation steps: a run stopped mid-epoch (at an optimizer step) and resumed ends with
    the weights and queued negatives of an uninterrupted run."""
    kwargs = {"queue_size": 16, "accumulation_steps": 2}
    reference, ref_module = _trainer(phantoms, tmp_path / "ref", epochs=2, **kwargs)
    reference.run()

    stopped, _ = _trainer(phantoms, tmp_path / "run", epochs=2, **kwargs)
    stopped.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: e.terminate())
    stopped.run()
    assert stopped.state.iteration == 2 and stopped.state.epoch_length == 3  # 23 train records / batch 8
    saved = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_00000002.pt", weights_only=True)
    assert saved["model"]["queue.scan.image_embeds"].shape[0] > 0  # the queue travels in the checkpoint

    resumed, module = _trainer(phantoms, tmp_path / "run", epochs=2, **kwargs)
    resumed.run()
    assert resumed.state.iteration == 6
    ref_state, state = ref_module.state_dict(), module.state_dict()
    assert set(ref_state) == set(state)
    # BERT's attention key biases are left out: softmax over keys is shift-invariant, so their gradient is zero in
    # exact arithmetic and pure round-off in practice, and AdamW scales that round-off up to learning-rate-sized steps
    # (a 1.4e-6 difference was seen under the full suite). Everything else is compared to 1e-6 (a resume that loses
    # or repeats a step, the queue or the schedule moves weights by ~1e-3), naming the worst tensor.
    worst = {name: float((tensor.double() - state[name].double()).abs().max()) if tensor.is_floating_point()
             else (0.0 if torch.equal(tensor, state[name]) else float("inf"))
             for name, tensor in ref_state.items() if tensor.numel() and not name.endswith("attention.self.key.bias")}
    name, diff = max(worst.items(), key=lambda kv: kv[1])
    assert diff <= 1e-6, f"{name} differs by {diff:.3g} after resume"
    assert torch.allclose(ref_module.loss.queues["scan"].get().image_embeds,
                          module.loss.queues["scan"].get().image_embeds, rtol=0, atol=1e-6)


def test_level_weight_zero_is_left_out_and_still_validated(phantoms: Path, tmp_path: Path):
    validation = _validation(phantoms)
    trainer, module = _trainer(phantoms, tmp_path, epochs=1, level_weights={"structure": 0}, handlers=[validation])
    losses = _record_losses(trainer)
    head_before = module.model.structure_projection[1].weight.detach().clone()
    trainer.run()
    assert module.model.config.level_weights == {"scan": 1.0, "structure": 0.0, "study": 1.0}
    assert all("loss_structure" not in x for x in losses) and any("loss_scan" in x for x in losses)
    assert torch.equal(module.model.structure_projection[1].weight, head_before)  # no structure gradient
    assert "val_structure_i2t_r1" in validation.last and "val_loss_structure" not in validation.last


def test_export_replaces_the_folder_atomically(tmp_path: Path):
    from radfm3d.contrastive.model import RadFM3DCLIPModel
    from radfm3d.contrastive.training import build_clip_model, export_clip_model

    model = build_clip_model("tiny", seed=0, load_text_weights=False, text_config=TINY_TEXT_CONFIG, projection_dim=16)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    export_clip_model(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial or old folder left
    assert not (out / "stale.txt").exists()
    reloaded = RadFM3DCLIPModel.from_pretrained(out)
    assert torch.equal(reloaded.logit_scale, model.logit_scale)


def test_bf16_autocast_step_keeps_a_float32_loss(phantoms: Path):
    """``precision="bf16"`` (forced; "auto" uses it on CUDA with bf16 only): the towers run in bfloat16, the loss in
    float32, and the step updates the weights."""
    from radfm3d.contrastive.data import build_clip_dataset
    from radfm3d.contrastive.training import (ContrastiveInferer, PrepareBatchCLIP, build_clip_model,
                                              build_training_module)

    model = build_clip_model("tiny", seed=0, load_text_weights=False, text_config=TINY_TEXT_CONFIG, projection_dim=32)
    module = build_training_module(model)
    records = build_clip_dataset(phantoms / "train.jsonl", limit=4)
    batch, _, _, _ = PrepareBatchCLIP()(_collate(phantoms)([records[i] for i in range(4)]), "cpu")
    seen: list[torch.dtype] = []
    hook = module.model.visual_projection.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = ContrastiveInferer(precision="bf16")(batch, module)
    hook.remove()
    assert torch.bfloat16 in seen and out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    before = module.model.visual_projection.weight.detach().clone()
    out["loss"].backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert not torch.equal(before, module.model.visual_projection.weight)
