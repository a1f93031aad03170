# Copyright (c) radfm3d contributors. Apache-2.0.
"""A real kill: a training subprocess (tiny preset, random LLaMA, CPU) is killed with SIGKILL at a random moment
between two checkpoints, then rerun; it resumes from the newest checkpoint and ends with weights bit-identical to
an uninterrupted run. Also: a corrupt newest checkpoint is named and skipped (resume falls back to the newest valid
one), and with none valid the error names every file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

#: the training child: 12 samples, batch 2 -> 6 iterations per epoch, 2 epochs, a checkpoint every 4 iterations.
#: It prints "iteration N" after each iteration (after that iteration's checkpoint, if any), and at the end writes
#: the model's state dict to OUT. With a third argument it imports everything, prints "ready" and waits for a line
#: on stdin before it starts (so the resumed run's imports overlap the killed run).
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler

    from radfm3d.engine.data import TrainingCollate, build_dataloader
    from radfm3d.engine.handlers import TrainingCheckpointer
    from radfm3d.engine.inferer import ForwardInferer
    from radfm3d.engine.loss import CausalLMLoss
    from radfm3d.engine.prepare import PrepareBatchVLM
    from radfm3d.engine.training import build_model, build_optimizer, configure_stage, warmup_cosine_schedule

    ckpt_dir, out = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:  # started early (imports done), trains once told to
        print("ready", flush=True)
        sys.stdin.readline()
    torch.set_num_threads(1)
    model = build_model("tiny", seed=0)
    config = model.config
    g = torch.Generator().manual_seed(123)
    items = []
    for i in range(12):
        prompt = torch.randint(3, 100, (3 + i % 3,), generator=g)
        answer = torch.randint(3, 100, (2 + i % 2,), generator=g)
        image = torch.tensor([config.image_start_token_id] + [config.image_token_id] * config.num_image_tokens
                             + [config.image_end_token_id])
        ids = torch.cat([torch.tensor([1]), image, prompt, answer, torch.tensor([2])])
        labels = ids.clone()
        labels[: 1 + len(image) + len(prompt)] = -100
        items.append({"id": f"s{i}", "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                      "pixel_values": torch.rand(1, 3, 32, 32, 8, generator=g)})
    loader = build_dataloader(items, batch_size=2, collate_fn=TrainingCollate(pad_token_id=0), shuffle=True, seed=0)
    configure_stage(model, "alignment")
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=len(loader) * 2)
    checkpointer = TrainingCheckpointer(ckpt_dir, model, optimizer, scheduler, save_interval=4, keep_last=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=model, optimizer=optimizer,
        loss_function=CausalLMLoss(), inferer=ForwardInferer(), prepare_batch=PrepareBatchVLM(),
        train_handlers=[LrScheduleHandler(scheduler, epoch_level=False, print_lr=False), checkpointer],
        decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: print(f"iteration {e.state.iteration}",
                                                                          flush=True))
    trainer.run()
    print(f"resumed_from {checkpointer.resumed_from.name if checkpointer.resumed_from else None}", flush=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    """
)
ITERATIONS, SAVE_INTERVAL = 12, 4


def _start(script: Path, ckpt: Path, out: Path, wait: bool = False) -> subprocess.Popen:
    """The child with stdout piped (progress lines) and stderr to ``OUT.log`` (a full pipe would block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen([sys.executable, str(script), str(ckpt), str(out)] + (["wait"] if wait else []),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def _finish(proc: subprocess.Popen, out: Path) -> list[str]:
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, Path(f"{out}.log").read_text()[-3000:]
    return stdout.splitlines()


def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "train_child.py"
    script.write_text(CHILD)
    rng = random.Random(20261203)
    # the kill lands inside an iteration that is not a save point, after the first checkpoint was written
    after = rng.choice([i for i in range(SAVE_INTERVAL + 1, ITERATIONS - 1) if (i + 1) % SAVE_INTERVAL])
    delay_fraction = rng.random()

    reference = _start(script, tmp_path / "ref_ckpt", tmp_path / "ref.pt")  # uninterrupted, in parallel
    victim = _start(script, tmp_path / "ckpt", tmp_path / "victim.pt")
    resumed = _start(script, tmp_path / "ckpt", tmp_path / "resumed.pt", wait=True)
    try:
        stamps: dict[int, float] = {}
        for line in victim.stdout:  # type: ignore[union-attr]
            if line.startswith("iteration "):
                stamps[int(line.split()[1])] = time.monotonic()
                if int(line.split()[1]) == after:
                    # somewhere inside iteration after+1: a random fraction of the last iteration's duration
                    step = stamps[after] - stamps.get(after - 1, stamps[after])
                    time.sleep(delay_fraction * 0.5 * step)
                    victim.send_signal(signal.SIGKILL)
                    break
        victim.wait(timeout=60)
        assert victim.returncode == -signal.SIGKILL, "the training run ended before it could be killed"
        done = [int(line.split()[1]) for line in victim.stdout.read().splitlines()  # type: ignore[union-attr]
                if line.startswith("iteration ")]
        last = max([after, *done])  # the last iteration the child reported complete
        assert last < ITERATIONS and not (tmp_path / "victim.pt").exists()
        saved = sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint_*.pt"))
        newest = int(saved[-1][len("checkpoint_"):-len(".pt")])
        # the newest checkpoint is the last save point reached (that of iteration last + 1 if the kill landed between
        # its save and its progress line); never a half-written file (atomic saves)
        assert newest in {(last // SAVE_INTERVAL) * SAVE_INTERVAL, ((last + 1) // SAVE_INTERVAL) * SAVE_INTERVAL}, (
            after, last, saved)

        assert resumed.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        resumed.stdin.write("go\n")  # type: ignore[union-attr]
        resumed.stdin.flush()  # type: ignore[union-attr]
        lines = _finish(resumed, tmp_path / "resumed.pt")
        assert lines[0] == f"iteration {newest + 1}" and lines[-2] == f"iteration {ITERATIONS}"
        assert lines[-1] == f"resumed_from checkpoint_{newest:08d}.pt"
        _finish(reference, tmp_path / "ref.pt")
    finally:
        for proc in (reference, victim, resumed):  # nothing left running if an assertion failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    want = torch.load(tmp_path / "ref.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, different[:5]
    assert not list((tmp_path / "ckpt").glob(".checkpoint_*.tmp-*"))  # a kill mid-save leaves no temporaries
