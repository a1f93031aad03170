# Copyright (c) radfm3d contributors. Apache-2.0.
"""radfm3d.engine on the tiny preset with synthetic token batches: loss, stages, schedule, checkpoints, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler

from radfm3d.engine.data import ResumableSampler, TrainingCollate, build_dataloader
from radfm3d.engine.handlers import TimeLimit, TrainingCheckpointer, atomic_torch_save, latest_checkpoint
from radfm3d.engine.inferer import ForwardInferer, GenerationInferer
from radfm3d.engine.loss import CausalLMLoss
from radfm3d.engine.prepare import PrepareBatchVLM
from radfm3d.engine.training import (
    build_model,
    build_optimizer,
    configure_stage,
    has_lora,
    load_trained_model,
    save_trained_model,
    warmup_cosine_schedule,
)


class SyntheticVLMData(torch.utils.data.Dataset):
    """Deterministic training examples in the processor's format: one image, a prompt, an answer."""

    def __init__(self, config, n: int = 6, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        n_img = config.num_image_tokens
        for i in range(n):
            prompt = torch.randint(3, 100, (3 + i % 3,), generator=g)
            answer = torch.randint(3, 100, (2 + i % 2,), generator=g)
            image = torch.tensor([config.image_start_token_id] + [config.image_token_id] * n_img
                                 + [config.image_end_token_id])
            ids = torch.cat([torch.tensor([1]), image, prompt, answer, torch.tensor([2])])
            labels = ids.clone()
            labels[: 1 + len(image) + len(prompt)] = -100
            self.items.append({"id": f"s{i}", "input_ids": ids, "attention_mask": torch.ones_like(ids),
                               "labels": labels, "pixel_values": torch.rand(1, 3, 32, 32, 8, generator=g)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _trainer(model, loader, max_epochs, ckpt_dir, save_interval=2, lr=1e-3, stage="alignment",
             accumulation_steps=1):
    configure_stage(model, stage)
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.01)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=len(loader) * 4)
    checkpointer = TrainingCheckpointer(ckpt_dir, model, optimizer, scheduler, save_interval=save_interval,
                                        keep_last=3)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=model,
        optimizer=optimizer, loss_function=CausalLMLoss(), inferer=ForwardInferer(), prepare_batch=PrepareBatchVLM(),
        train_handlers=[LrScheduleHandler(scheduler, epoch_level=False, print_lr=False), checkpointer],
        decollate=False, accumulation_steps=accumulation_steps,
    )
    return trainer, checkpointer


def _loader(model, seed=0):
    data = SyntheticVLMData(model.config)
    return build_dataloader(data, batch_size=2, collate_fn=TrainingCollate(pad_token_id=0), shuffle=True, seed=seed)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Kill(RuntimeError):
    pass


def test_loss_matches_model_and_ignores_masked_positions():
    model = build_model("tiny", seed=0)
    batch = TrainingCollate(pad_token_id=0)([SyntheticVLMData(model.config)[i] for i in range(2)])
    ids, labels, _, kwargs = PrepareBatchVLM()(batch, torch.device("cpu"))
    out = ForwardInferer()(ids, model, **kwargs)
    loss = CausalLMLoss()(out, labels)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, model.loss_from_logits(out.logits, labels), atol=1e-6)
    # changing logits at ignored positions leaves the loss unchanged
    logits = out.logits.detach().clone()
    first_supervised = int((labels[0] != -100).nonzero()[0])
    logits[0, : first_supervised - 1] += 5.0
    assert torch.allclose(CausalLMLoss()(logits, labels), loss.detach(), atol=1e-6)
    with pytest.raises(ValueError):
        CausalLMLoss()(logits, labels[:, :-1])


def test_blank_images_prepare_batch():
    model = build_model("tiny", seed=0)
    batch = TrainingCollate(pad_token_id=0)([SyntheticVLMData(model.config)[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 1, 3, 32, 32, 8) and batch["image_mask"].all()
    assert batch["id"] == ["s0", "s1", "s2"]
    _, _, _, kwargs = PrepareBatchVLM(blank_images=True)(batch)
    assert float(kwargs["pixel_values"].abs().sum()) == 0.0


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_schedule(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8)  # linear warm-up
    assert lrs[4] == pytest.approx(1.0)  # peak
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way down the cosine
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)  # floor


def test_stages_freeze_switches_and_lora(tmp_path: Path):
    model = build_model("tiny", seed=0)
    configure_stage(model, "alignment")
    assert not any(p.requires_grad for p in model.language_model.parameters())
    for part in (model.vision_model, model.resampler, model.projector):
        assert all(p.requires_grad for p in part.parameters())
    configure_stage(model, "alignment", vision=False)
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    configure_stage(model, "instruction", lora_r=4)
    assert has_lora(model)
    llm_trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    with pytest.raises(ValueError):
        configure_stage(model, "pretend")
    # a LoRA model saves (base named or not) and loads back to the same outputs
    with torch.no_grad():
        for n, p in model.language_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # LoRA B starts at 0; make the adapter matter
    save_trained_model(model, tmp_path / "m")
    loaded = load_trained_model(tmp_path / "m")
    assert has_lora(loaded)
    ids = torch.tensor([[1, 5, 6, 7]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)


def test_generation_inferer_returns_new_tokens():
    model = build_model("tiny", seed=0).eval()
    ids = torch.tensor([[0, 1, 5, 6], [1, 7, 8, 9]])
    out = GenerationInferer(max_new_tokens=3)(ids, model, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 3


def test_atomic_save_and_weights_only(tmp_path: Path):
    path = atomic_torch_save({"a": torch.ones(2), "n": 3, "t": (1, "x")}, tmp_path / "c" / "checkpoint_00000001.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint_00000001.pt"]
    assert torch.load(path, weights_only=True)["n"] == 3
    assert latest_checkpoint(tmp_path / "c") == path


def test_sampler_order_is_seeded_and_skippable():
    s = ResumableSampler(list(range(10)), shuffle=True, seed=5)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1)
    s.skip_next(4)
    assert list(s) == full[4:]
    assert list(s) == full  # the skip applies once
    s.set_epoch(2)
    assert list(s) != full


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    """Uninterrupted run: 2 epochs x 3 iterations."""
    model = build_model("tiny", seed=0)
    trainer, _ = _trainer(model, _loader(model), 2, tmp_path_factory.mktemp("ref"))
    trainer.run()
    assert trainer.state.iteration == 6
    return _state(model)


@pytest.mark.parametrize("kill_at", [4, 3])  # mid-epoch and at an epoch end
def test_kill_and_resume_gives_the_same_weights(tmp_path: Path, kill_at: int, reference_weights):
    # run 1: killed right after the checkpoint of iteration `kill_at`
    model = build_model("tiny", seed=0)
    trainer, _ = _trainer(model, _loader(model), 2, tmp_path / "run", save_interval=kill_at)

    @trainer.on(Events.ITERATION_COMPLETED(once=kill_at))
    def _kill(engine):
        raise Kill(f"simulated kill after iteration {kill_at}")

    with pytest.raises(Kill):
        trainer.run()
    assert latest_checkpoint(tmp_path / "run").name == f"checkpoint_{kill_at:08d}.pt"

    # run 2: a fresh process-like start (new model, optimizer, loader) resumes and finishes
    torch.manual_seed(999)  # the global RNG must be restored from the checkpoint, not inherited
    model = build_model("tiny", seed=0)
    trainer, checkpointer = _trainer(model, _loader(model), 2, tmp_path / "run", save_interval=kill_at)
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.iteration))
    trainer.run()
    assert checkpointer.resumed_from is not None
    assert seen[0] == kill_at + 1 and trainer.state.iteration == 6
    resumed = _state(model)
    assert reference_weights.keys() == resumed.keys()
    for key in reference_weights:
        assert torch.equal(reference_weights[key], resumed[key]), key


def test_run_can_be_extended(tmp_path: Path):
    model = build_model("tiny", seed=0)
    trainer, _ = _trainer(model, _loader(model), 1, tmp_path / "ext")
    trainer.run()
    assert trainer.state.iteration == 3
    model = build_model("tiny", seed=0)
    trainer, checkpointer = _trainer(model, _loader(model), 2, tmp_path / "ext")
    trainer.run()
    assert checkpointer.resumed_from is not None and trainer.state.iteration == 6 and trainer.state.epoch == 2
    # asking for fewer epochs than the checkpoint holds is an error, not a silent restart
    model = build_model("tiny", seed=0)
    trainer, _ = _trainer(model, _loader(model), 1, tmp_path / "ext")
    with pytest.raises(ValueError, match="max_epochs"):
        trainer.run()


def test_time_limit_stops_saves_and_the_rerun_finishes_like_an_uninterrupted_run(tmp_path: Path, reference_weights,
                                                                                 monkeypatch):
    import radfm3d.engine.handlers as handlers

    clock = {"now": 0.0}
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock["now"])
    model = build_model("tiny", seed=0)
    trainer, _ = _trainer(model, _loader(model), 2, tmp_path / "run", save_interval=100)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: clock.__setitem__("now", 15.0 * e.state.iteration))
    TimeLimit(max_minutes=1).attach(trainer)
    trainer.run()  # 15 s per iteration: the limit of 60 s is reached after iteration 4, mid-epoch
    assert trainer.state.iteration == 4 and trainer.should_terminate
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint_00000004.pt"  # saved on TERMINATE
    model = build_model("tiny", seed=0)
    trainer, checkpointer = _trainer(model, _loader(model), 2, tmp_path / "run", save_interval=100)
    trainer.run()
    assert checkpointer.resumed_from is not None and trainer.state.iteration == 6
    resumed = _state(model)
    for key in reference_weights:
        assert torch.equal(reference_weights[key], resumed[key]), key
    with pytest.raises(ValueError, match="max_minutes"):
        TimeLimit(0)


def test_load_processor_of_a_saved_folder_never_needs_the_base_llm(tmp_path: Path, monkeypatch):
    import json

    import radfm3d.processing as processing
    from radfm3d.engine.training import load_processor
    from radfm3d.transforms import PreprocessingRecipe

    model = build_model("tiny", seed=0)
    save_trained_model(model, tmp_path / "m", load_processor("tiny"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["text_model_name_or_path"] = "smollm2-135m-instruct"  # a named base whose files this machine lacks
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))

    def no_base(*args, **kwargs):
        raise AssertionError("the base LLM's tokenizer was loaded")

    monkeypatch.setattr(processing, "_load_base_tokenizer", no_base)
    recipe = PreprocessingRecipe(spatial_size=(40, 40, 12))
    processor = load_processor(tmp_path / "m", recipe)
    assert processor.recipe == recipe
    assert processor.tokenizer("abc")["input_ids"] == load_processor(tmp_path / "m").tokenizer("abc")["input_ids"]


def test_checkpoint_keeps_the_running_statistics_of_trained_modules(tmp_path):
    """Only trained weights are checkpointed (the frozen base is named, not copied), but a trained batch-norm layer's
    running statistics are state too: a resumed run must not restart them."""
    net = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 1), torch.nn.BatchNorm1d(2), torch.nn.Linear(4, 4))
    net[2].requires_grad_(False)  # frozen: neither its weights nor (it has none) its buffers are saved
    net.train()(torch.randn(8, 1, 4))  # moves the running statistics
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    state = TrainingCheckpointer(tmp_path, net, optimizer, save_frozen=False).model_state()
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(state)
    assert torch.equal(state["1.running_mean"], net[1].running_mean) and "2.weight" not in state


def _corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "not_a_checkpoint":
        torch.save({"format": "something else", "model": {}}, path)
    elif kind == "missing_optimizer":
        ckpt = torch.load(path, weights_only=True)
        del ckpt["optimizer"]
        torch.save(ckpt, path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "not_a_checkpoint", "missing_optimizer"])
def test_corrupt_checkpoints_are_named(tmp_path: Path, kind: str):
    from radfm3d.engine.handlers import CHECKPOINT_FORMAT, read_training_checkpoint, rng_state
    from radfm3d.errors import RadFM3DInputError

    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    ckpt = {"format": CHECKPOINT_FORMAT, "iteration": 4, "epoch": 2, "model": net.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng_state()}
    path = atomic_torch_save(ckpt, tmp_path / "checkpoint_00000004.pt")
    assert read_training_checkpoint(path)["iteration"] == 4
    _corrupt(path, kind)
    with pytest.raises(RadFM3DInputError, match=r"checkpoint_00000004.pt: (corrupt training checkpoint|not a radfm3d)"):
        read_training_checkpoint(path)


def test_corrupt_latest_checkpoint_is_named_and_resume_falls_back(tmp_path: Path, reference_weights, caplog):
    kind = "truncated"
    from radfm3d.engine.handlers import read_training_checkpoint
    from radfm3d.errors import RadFM3DInputError

    model = build_model("tiny", seed=0)
    trainer, _ = _trainer(model, _loader(model), 2, tmp_path / "run", save_interval=2)

    @trainer.on(Events.ITERATION_COMPLETED(once=4))
    def _kill(engine):
        raise Kill("simulated kill after iteration 4")

    with pytest.raises(Kill):
        trainer.run()
    newest = latest_checkpoint(tmp_path / "run")
    assert newest.name == "checkpoint_00000004.pt"
    _corrupt(newest, kind)
    with pytest.raises(RadFM3DInputError, match="checkpoint_00000004.pt"):
        read_training_checkpoint(newest)

    model = build_model("tiny", seed=0)
    trainer, checkpointer = _trainer(model, _loader(model), 2, tmp_path / "run", save_interval=2)
    with caplog.at_level("WARNING", logger="radfm3d.engine.handlers"):
        trainer.run()
    assert checkpointer.resumed_from.name == "checkpoint_00000003.pt"  # saves: 2, 3 (epoch end), 4
    assert [p.name for p, _ in checkpointer.skipped] == ["checkpoint_00000004.pt"]
    assert "checkpoint_00000004.pt" in caplog.text and "falling back" in caplog.text
    assert (tmp_path / "run" / "checkpoint_00000004.pt.corrupt").is_file()  # kept aside, never loaded again
    resumed = _state(model)
    for key in reference_weights:
        assert torch.equal(reference_weights[key], resumed[key]), key


def test_no_readable_checkpoint_names_every_file(tmp_path: Path):
    from radfm3d.errors import RadFM3DInputError

    model = build_model("tiny", seed=0)
    trainer, _ = _trainer(model, _loader(model), 1, tmp_path / "run", save_interval=2)
    trainer.run()
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint_*.pt"))
    assert names == ["checkpoint_00000002.pt", "checkpoint_00000003.pt"]
    (tmp_path / "run" / names[0]).write_bytes(b"")
    (tmp_path / "run" / names[1]).write_bytes(b"PK\x03\x04 not really a zip")
    for _ in range(2):  # nothing is set aside when there is no valid one: a rerun names them again
        model = build_model("tiny", seed=0)
        trainer, _ = _trainer(model, _loader(model), 2, tmp_path / "run", save_interval=2)
        with pytest.raises(RadFM3DInputError, match="no readable training checkpoint: checkpoint_00000003.pt: "
                           "corrupt.*checkpoint_00000002.pt: corrupt"):
            trainer.run()


def test_non_finite_weights_in_a_checkpoint_are_refused(tmp_path: Path):
    from radfm3d.engine.handlers import CHECKPOINT_FORMAT, read_training_checkpoint
    from radfm3d.errors import RadFM3DInputError

    ckpt = {"format": CHECKPOINT_FORMAT, "iteration": 1, "epoch": 1, "optimizer": {}, "rng": {},
            "model": {"projector.weight": torch.tensor([1.0, float("nan")])}}
    path = atomic_torch_save(ckpt, tmp_path / "checkpoint_00000001.pt")
    with pytest.raises(RadFM3DInputError, match="non-finite values in 'projector.weight'"):
        read_training_checkpoint(path)


@pytest.mark.parametrize("bad", [0, -3, "many", 2.5, True])
def test_generation_inferer_refuses_a_budget_below_one(bad):
    from radfm3d.errors import RadFM3DInputError

    with pytest.raises(RadFM3DInputError, match="max_new_tokens: must be an integer >= 1"):
        GenerationInferer(max_new_tokens=bad)
    assert GenerationInferer(max_new_tokens="32").max_new_tokens == 32  # a bundle override arrives as text
