# Copyright (c) radfm3d contributors. Apache-2.0.
"""FSDP2 training of the radfm3d_demo bundle (train.json + multi_gpu_fsdp.json) with 2 processes on the CPU
(torchrun, gloo), tiny preset, instruction stage (LoRA on the LLM, frozen base):

- the run trains (the loss of the second epoch is below the first's), and ends with the weights of the same training
  without sharding (DDP) up to float32 rounding; with bf16 compute it trains too, its losses within 0.05 of float32's;
- each rank holds about half of the model's parameter elements (sharded parameters, measured);
- a run stopped mid-epoch and resumed from its sharded DCP checkpoint ends with the same weights, bit for bit, as
  an uninterrupted run;
- a newest checkpoint that one rank cannot read is skipped on every rank: the run resumes from the one before and
  again ends with the uninterrupted run's weights;
- the exported model loads with ``RadFM3DForCausalLM.from_pretrained`` and equals the gathered weights;
- a step where one rank's batch has an image and the other's is text only equals DDP's (find_unused_parameters).

One torchrun launch runs the six workflows (uninterrupted, stopped, resumed, fallback, bf16, DDP) and the mixed
step in one process group. In this process (one-rank gloo group): a findings model exports from FSDP; a checkpoint
without the frozen weights round-trips; a checkpoint of another world size is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "radfm3d_demo"
CONFIGS = BUNDLE / "configs"

#: 8 records over 2 ranks at batch 1 -> 4 iterations per epoch, 2 epochs; a checkpoint every 2 iterations; the
#: stopped run terminates after iteration 3 (mid-epoch; the TERMINATE checkpoint is checkpoint_00000003).
ITERATIONS, STOP_AT = 8, 3
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from torch.nn.parallel import DistributedDataParallel

    from radfm3d.engine.distributed import gather_full_state, parameter_counts, shard_model
    from radfm3d.engine.handlers import loss_of
    from radfm3d.engine.training import build_model, build_optimizer, configure_stage, unwrap_model

    configs, data, work = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)


    def run(name, ckpt_run, stop_at=None, override="multi_gpu_fsdp.json", precision="auto"):
        started = time.monotonic()
        overrides = {
            "bundle_root": str(configs.parent), "dataset_dir": data, "model_name_or_path": "tiny",
            "output_dir": str(work / ckpt_run), "model_dir": str(work / name / "model"), "max_epochs": 2,
            "batch_size": 1, "limit": 8, "num_workers": 0, "show_progress": False, "save_interval": 2,
            "warmup_steps": 1, "log_every": 100, "learning_rate": 0.002, "fsdp_precision": precision,
        }
        wf = ConfigWorkflow(config_file=[str(configs / "train.json"), str(configs / override)],
                            meta_file=str(configs / "metadata.json"), workflow_type="train", **overrides)
        wf.initialize()
        trainer, network = wf.trainer, wf.parser.get_parsed_content("network")
        losses = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(loss_of(e.state.output)))
        if stop_at is not None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
        wf.run()
        local, total = parameter_counts(network)
        optim = wf.parser.get_parsed_content("train#optimizer")
        optim_local = sum(v.to_local().numel() if hasattr(v, "to_local") else v.numel()
                          for s in optim.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim)
        rank = dist.get_rank()
        checkpointer = wf.parser.get_parsed_content("train#handlers")[1]
        report = {"losses": losses, "local": local, "total": total, "optim_local": optim_local,
                  "iteration": trainer.state.iteration, "type": type(network).__name__,
                  "resumed_from": checkpointer.resumed_from.name if checkpointer.resumed_from else None,
                  "skipped": [[p.name, why] for p, why in checkpointer.skipped]}
        (work / name).mkdir(parents=True, exist_ok=True)
        (work / name / f"report_rank{rank}.json").write_text(json.dumps(report))
        state = gather_full_state(network)
        if rank == 0:
            torch.save(state, work / name / "gathered.pt")
        dist.barrier()
        print(f"{name}: {time.monotonic() - started:.1f} s", flush=True)
        return wf


    run("full", "full")
    run("stopped", "stopped", stop_at=%(stop)d)
    run("resumed", "stopped")
    # the newest checkpoint unreadable on rank 1 only: every rank falls back to the one before
    if dist.get_rank() == 0:
        (work / "stopped" / "checkpoints" / "checkpoint_00000008" / "trainer_rank1.pt").write_bytes(b"garbage")
    dist.barrier()
    run("fallback", "stopped")
    # the same training with bf16 compute (FSDP's mixed-precision policy), and unsharded with DDP (float32)
    run("bf16", "bf16", precision="bf16")
    wf = run("ddp", "ddp", override="multi_gpu_train.json")


    def mixed_batch_step(wrap):
        # one AdamW step where rank 0's batch has an image and rank 1's is text only (vision parts unused there)
        model = wrap(configure_stage(build_model("tiny", seed=0), "instruction", lora_dropout=0.0))
        optimizer = build_optimizer(model, lr=1e-3)
        config, rank = unwrap_model(model).config, dist.get_rank()
        image = [config.image_start_token_id] + [config.image_token_id] * config.num_image_tokens + [
            config.image_end_token_id]
        ids = torch.tensor([[1] + (image if rank == 0 else [9] * len(image)) + [5, 6, 7, 2]])
        labels = ids.clone()
        labels[:, :-4] = -100
        pixels = {"pixel_values": torch.rand(1, 3, 32, 32, 8, generator=torch.Generator().manual_seed(0))}
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **(pixels if rank == 0 else {}))
        out.loss.backward()
        optimizer.step()
        return gather_full_state(model)


    mixed = {"fsdp": mixed_batch_step(shard_model),
             "ddp": mixed_batch_step(lambda m: DistributedDataParallel(m, find_unused_parameters=True)),
             "start": build_model("tiny", seed=0).state_dict()}
    if dist.get_rank() == 0:
        torch.save(mixed, work / "mixed.pt")
    wf.finalize()
    """ % {"stop": STOP_AT}
)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    from radfm3d.data.phantoms import generate_phantoms

    work = tmp_path_factory.mktemp("fsdp")
    generate_phantoms(work / "phantoms", n=2, seed=0, grid=(32, 32, 8), matrix=(32, 40), slices=(8, 10),
                      dicom_fraction=0.0, prior_fraction=0.0, progress=False)
    script = work / "child.py"
    script.write_text(CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(script), str(CONFIGS), str(work / "phantoms"), str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return work


def _report(work: Path, name: str, rank: int) -> dict:
    return json.loads((work / name / f"report_rank{rank}.json").read_text())


@pytest.mark.slow  # the one torchrun launch they share: ~1 min of CPU on 2 cores
def test_fsdp_trains_and_shards(fsdp_runs: Path):
    reports = [_report(fsdp_runs, "full", r) for r in (0, 1)]
    for rep in reports:
        assert rep["type"].startswith("FSDP") and rep["iteration"] == ITERATIONS
        losses = rep["losses"]
        assert len(losses) == ITERATIONS and all(torch.isfinite(torch.tensor(losses)))
        half = ITERATIONS // 2
        assert sum(losses[half:]) / half < sum(losses[:half]) / half  # epoch 2 below epoch 1 (same 4 samples)
    # every parameter is sharded along dim 0: each rank holds about half of the elements (FSDP pads uneven dims)
    total = reports[0]["total"]
    assert reports[1]["total"] == total and total > 100_000
    assert sum(r["local"] for r in reports) == total
    for rep in reports:
        assert 0.45 * total <= rep["local"] <= 0.55 * total, (rep["local"], total)
    # the optimizer state (AdamW moments of the trainable parameters) is sharded the same way
    assert abs(reports[0]["optim_local"] - reports[1]["optim_local"]) <= 0.1 * reports[0]["optim_local"]


@pytest.mark.slow  # the one torchrun launch they share: ~1 min of CPU on 2 cores
def test_fsdp_stop_and_resume_is_exact(fsdp_runs: Path):
    stopped = [_report(fsdp_runs, "stopped", r) for r in (0, 1)]
    resumed = [_report(fsdp_runs, "resumed", r) for r in (0, 1)]
    full = [_report(fsdp_runs, "full", r) for r in (0, 1)]
    ckpts = sorted(p.name for p in (fsdp_runs / "stopped" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint_00000006", "checkpoint_00000008"]  # keep_last=2, no partial folder left
    shards = sorted(p.name for p in (fsdp_runs / "stopped" / "checkpoints" / ckpts[-1]).iterdir())
    assert ".metadata" in shards and {"trainer_rank0.pt", "trainer_rank1.pt"} <= set(shards)
    assert sum(name.endswith(".distcp") for name in shards) == 2  # one shard file per rank
    for r in (0, 1):
        assert stopped[r]["iteration"] == STOP_AT and resumed[r]["resumed_from"] == f"checkpoint_{STOP_AT:08d}"
        # the resumed run continues with the same batches and dropout masks: the same losses as the full run
        assert stopped[r]["losses"] + resumed[r]["losses"] == full[r]["losses"]
    a = torch.load(fsdp_runs / "full" / "gathered.pt", weights_only=True)
    b = torch.load(fsdp_runs / "resumed" / "gathered.pt", weights_only=True)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    early = torch.load(fsdp_runs / "stopped" / "gathered.pt", weights_only=True)
    lora_b = next(k for k in a if "lora_B" in k)
    assert not torch.equal(early[lora_b], a[lora_b])  # the comparison can fail: iteration 3 differs from 8


@pytest.mark.slow  # the one torchrun launch they share: ~1 min of CPU on 2 cores
def test_fsdp_resume_skips_a_checkpoint_one_rank_cannot_read(fsdp_runs: Path):
    full = [_report(fsdp_runs, "full", r) for r in (0, 1)]
    for r in (0, 1):
        rep = _report(fsdp_runs, "fallback", r)
        assert rep["resumed_from"] == "checkpoint_00000006"
        assert rep["losses"] == full[r]["losses"][6:]
    skipped = _report(fsdp_runs, "fallback", 1)["skipped"]
    assert skipped[0][0] == "checkpoint_00000008" and "trainer_rank1.pt" in skipped[0][1]
    assert _report(fsdp_runs, "fallback", 0)["skipped"] == [["checkpoint_00000008", "unreadable on another rank"]]
    a = torch.load(fsdp_runs / "full" / "gathered.pt", weights_only=True)
    b = torch.load(fsdp_runs / "fallback" / "gathered.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow  # the one torchrun launch they share: ~1 min of CPU on 2 cores
def test_fsdp_export_loads_with_from_pretrained(fsdp_runs: Path):
    from radfm3d.modeling.model import RadFM3DForCausalLM

    gathered = torch.load(fsdp_runs / "full" / "gathered.pt", weights_only=True)
    model = RadFM3DForCausalLM.from_pretrained(str(fsdp_runs / "full" / "model"))
    assert (fsdp_runs / "full" / "model" / "adapter_config.json").is_file()
    state = model.state_dict()
    assert set(state) == set(gathered)
    for key, value in gathered.items():
        assert torch.equal(state[key], value), key


@pytest.mark.slow  # the one torchrun launch they share: ~1 min of CPU on 2 cores
def test_fsdp_batch_that_skips_the_vision_parts_on_one_rank(fsdp_runs: Path):
    """A text-only batch on rank 1 (vision encoder, resampler, projector unused there) while rank 0 has an image:
    the ranks still reduce the same gradients (no collective mismatch) and the step equals DDP's with
    find_unused_parameters."""
    mixed = torch.load(fsdp_runs / "mixed.pt", weights_only=True)
    fsdp, ddp, start = mixed["fsdp"], mixed["ddp"], mixed["start"]
    assert fsdp.keys() == ddp.keys()
    key = "vision_model.patch_embedding.proj.weight"
    assert not torch.equal(fsdp[key], start[key])  # rank 0's image moved the vision encoder
    for name in fsdp:
        assert torch.allclose(fsdp[name], ddp[name], atol=1e-6, rtol=0), name


@pytest.mark.slow  # the one torchrun launch they share: ~1 min of CPU on 2 cores
def test_fsdp_matches_ddp_and_bf16_trains(fsdp_runs: Path):
    """Sharding changes where the numbers live, not the training: FSDP (float32) ends where DDP ends."""
    fsdp = torch.load(fsdp_runs / "full" / "gathered.pt", weights_only=True)
    ddp = torch.load(fsdp_runs / "ddp" / "gathered.pt", weights_only=True)
    start = torch.load(fsdp_runs / "stopped" / "gathered.pt", weights_only=True)
    assert fsdp.keys() == ddp.keys()
    moved = max(float((fsdp[k] - start[k]).abs().max()) for k in fsdp)
    worst = max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp)
    assert moved > 1e-3 and worst < 1e-5, (moved, worst)
    for r in (0, 1):
        fp32, bf16 = _report(fsdp_runs, "full", r)["losses"], _report(fsdp_runs, "bf16", r)["losses"]
        ddp_losses = _report(fsdp_runs, "ddp", r)["losses"]
        assert max(abs(a - b) for a, b in zip(fp32, ddp_losses)) < 1e-4
        assert fp32 != bf16 and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05  # bf16 compute ran
        assert sum(bf16[4:]) < sum(bf16[:4])


def test_shard_model_needs_a_process_group():
    from radfm3d.engine.distributed import decoder_layers, shard_model
    from radfm3d.engine.training import build_model

    model = build_model("tiny", seed=0)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(RuntimeError, match="torchrun"):
        shard_model(model)


@pytest.fixture
def one_process_group(tmp_path: Path):
    """A gloo process group of this process alone (world size 1), destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_export_of_a_sharded_findings_model(one_process_group, tmp_path: Path):
    """A subclass with more state than its config (a findings model: schema, tokenizer, reader head) exports from
    FSDP and loads back as that class with the gathered weights."""
    from radfm3d.data.phantom_schemas import schema_path
    from radfm3d.engine.distributed import export_sharded_model, gather_full_state, shard_model
    from radfm3d.engine.training import build_model, configure_stage
    from radfm3d.findings.heads import StructuredFindingsHead
    from radfm3d.findings.model import RadFM3DFindingsModel, attach_reader
    from radfm3d.findings.schema import load_schema
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    base, schema = build_model("tiny", seed=0), load_schema(schema_path("phantom"))
    head = StructuredFindingsHead(base.config.vision.hidden_size, base.config.num_image_tokens, schema, 16)
    tokenizer = RadFM3DProcessor.from_model_config("tiny").tokenizer
    model = attach_reader(base, schema, {f"head.{k}": v for k, v in head.state_dict().items()}, tokenizer,
                          {"num_tokens": 160, "threshold": 0.5, "head_hidden": 16}).train()
    model = shard_model(configure_stage(model, "instruction"))
    gathered = gather_full_state(model)
    export_sharded_model(model, tmp_path / "out")
    loaded = RadFM3DForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(loaded) is RadFM3DFindingsModel and (tmp_path / "out" / "adapter_config.json").is_file()
    state = loaded.state_dict()
    assert set(state) == set(gathered) and any(k.startswith("reader.head.") for k in state)
    for key, value in gathered.items():
        assert torch.equal(state[key], value), key


def test_sharded_checkpoint_without_frozen_weights_round_trip(one_process_group, tmp_path: Path):
    """One process (gloo, world size 1). ``save_frozen=False`` (what "auto" picks for a named base LLM): only the
    trained parameters and their optimizer state are written, and a freshly built model takes them back exactly.
    A checkpoint whose progress files say 2 ranks is named and refused."""
    from ignite.engine import Engine

    from radfm3d.engine.distributed import (ShardedCheckpointer, gather_full_state, list_sharded_checkpoints,
                                            shard_model)
    from radfm3d.engine.training import build_model, build_optimizer, configure_stage
    from radfm3d.errors import RadFM3DInputError

    def fresh():
        model = shard_model(configure_stage(build_model("tiny", seed=0), "instruction"))
        return model, build_optimizer(model, lr=1e-2)

    def engine(iteration: int = 0) -> Engine:
        e = Engine(lambda e, b: None)
        e.state.iteration, e.state.epoch, e.state.epoch_length, e.state.max_epochs = iteration, 1, 4, 2
        return e

    model, optimizer = fresh()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    optimizer.step()
    folder = ShardedCheckpointer(tmp_path / "ckpt", model, optimizer, save_frozen=False).save(engine(4))
    assert list_sharded_checkpoints(tmp_path / "ckpt") == [folder]
    assert (folder / ".metadata").is_file() and (folder / "trainer_rank0.pt").is_file()
    progress = torch.load(folder / "trainer_rank0.pt", weights_only=True)
    assert progress["world_size"] == 1 and progress["iteration"] == 4 and progress["full_state"] is False

    restored, restored_optimizer = fresh()
    resumed = engine()
    assert ShardedCheckpointer(tmp_path / "ckpt", restored, restored_optimizer, save_frozen=False).load(resumed) \
        == folder
    assert resumed.state.iteration == 4
    before, after = gather_full_state(model), gather_full_state(restored)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    moments = [s["exp_avg"].full_tensor() for s in restored_optimizer.state.values()]
    assert moments and all(torch.allclose(m, torch.full_like(m, 0.1)) for m in moments)  # (1 - beta1) x grad 1

    torch.save({**progress, "world_size": 2}, folder / "trainer_rank0.pt")
    with pytest.raises(RadFM3DInputError, match="saved with 2 ranks, this run has 1"):
        ShardedCheckpointer(tmp_path / "ckpt", restored, restored_optimizer, save_frozen=False).load(engine())
