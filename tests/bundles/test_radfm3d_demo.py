# Copyright (c) radfm3d contributors. Apache-2.0.
"""The radfm3d_demo bundle end to end, the model-zoo way: ConfigWorkflow + overrides + check_properties.

Tiny preset, a handful of tiny phantoms generated into a temp folder, one short epoch: train -> evaluate -> infer,
plus a 2-process torchrun (gloo, CPU) training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monai.bundle import ConfigWorkflow

sys.path.insert(0, str(Path(__file__).parent))
from bundle_helpers import (bundle_files, check_config_targets, check_metadata, check_workflow,  # noqa: E402
                            tiny_phantoms)

BUNDLE, CONFIGS, META, LOGGING = bundle_files("radfm3d_demo")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Tiny RadPhantom set (32x32x8 grid) under a temp folder."""
    return tiny_phantoms(tmp_path_factory.mktemp("radfm3d_demo"), n=4)


def _train_overrides(work: Path) -> dict:
    return {
        "bundle_root": str(BUNDLE), "dataset_dir": str(work / "phantoms"), "model_name_or_path": "tiny",
        "output_dir": str(work / "run"), "model_dir": str(work / "model"), "max_epochs": 1, "batch_size": 2,
        "limit": 4, "num_workers": 0, "show_progress": False, "save_interval": 1, "warmup_steps": 1, "log_every": 1,
    }


@pytest.fixture(scope="module")
def trained(workdir: Path) -> Path:
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), meta_file=META, logging_file=LOGGING,
                              workflow_type="train", **_train_overrides(workdir))
    check_workflow(workflow)
    return workdir


def test_metadata_and_layout():
    meta = check_metadata(CONFIGS)
    assert {"image", "text"} <= set(meta["network_data_format"]["inputs"])
    for name in ("LICENSE", "docs/README.md", "configs/logging.conf", "configs/inference.json"):
        assert (BUNDLE / name).is_file(), name
    check_config_targets(CONFIGS)


def test_train(trained: Path):
    model_dir = trained / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert (model_dir / "preprocessing.json").is_file()  # the recipe travels with the model
    ckpts = sorted((trained / "run" / "checkpoints").glob("checkpoint_*.pt"))
    assert ckpts and ckpts[-1].name == "checkpoint_00000002.pt"  # 4 records / batch 2 = 2 iterations
    assert list((trained / "run").glob("events.out.tfevents*"))  # TensorBoard


def test_evaluate(trained: Path):
    eval_dir = trained / "eval"
    overrides = {**_train_overrides(trained), "eval_manifest": str(trained / "phantoms" / "val.jsonl"),
                 "eval_dir": str(eval_dir), "eval_limit": 3, "eval_batch_size": 2, "max_new_tokens": 4,
                 "embeddings": False, "n_resamples": 20}
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
                              meta_file=META, logging_file=LOGGING, workflow_type="eval", **overrides)
    check_workflow(workflow)
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("prediction" in r and "grid_geometry" in r for r in rows)
    assert len((eval_dir / "blind_predictions.jsonl").read_text().splitlines()) == 3
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["meta"]["runs"] == ["blind", "model"] and results["meta"]["n_records"] == 3
    # the answer NLL with the image and with the blank one, and the paired image gain per family
    assert all(isinstance(r["answer_nll"], float) and r["answer_nll"] > 0 for r in rows)
    for fam in results["families"].values():
        assert fam["figures"]["answer_nll"]["n"] == fam["n"] == fam["image_gain"]["n"]
        assert "answer_nll" in fam["blind"]
    assert "Image gain" in (eval_dir / "report.md").read_text()


def test_infer(trained: Path):
    from radfm3d.io import load_image, save_dicom_series

    scans = trained / "scans"
    scans.mkdir()
    record = json.loads((trained / "phantoms" / "val.jsonl").read_text().splitlines()[0])
    nifti = trained / "phantoms" / record["images"][0]
    (scans / "ct.nii.gz").write_bytes(nifti.read_bytes())
    save_dicom_series(load_image(nifti), scans / "series", modality=record.get("modality", "CT"))
    out = trained / "outputs"
    overrides = {"bundle_root": str(BUNDLE), "model_dir": str(trained / "model"), "dataset_dir": str(scans),
                 "output_dir": str(out), "max_new_tokens": 4,
                 "prompts": ["report", "Is there a lesion?", "Locate the spleen."]}
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), meta_file=META, logging_file=LOGGING,
                              workflow_type="infer", **overrides)
    check_workflow(workflow)
    results = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(results) == ["ct.json", "series.json"]
    for res in results.values():
        assert len(res["answers"]) == 3 and res["answers"][1]["prompt"] == "<image> Is there a lesion?"
        assert res["grid_geometry"]["spatial_size"] == [32, 32, 8]
        assert res["recipe"]["spatial_size"] == [32, 32, 8] and res["model"] == str(trained / "model")
        assert set(res["timings_s"]) >= {"load", "preprocess", "generate"}
    assert results["series.json"]["source_format"].startswith("dicom")


def test_finetune_own_manifest_with_lora(trained: Path):
    """finetune.json: continue from the trained model on a user's manifest, LoRA on the LLM (instruction stage)."""
    overrides = {**_train_overrides(trained), "manifest": str(trained / "phantoms" / "val.jsonl"),
                 "model_name_or_path": str(trained / "model"), "output_dir": str(trained / "ft"),
                 "model_dir": str(trained / "ft_model")}
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "finetune.json")],
                              meta_file=META, logging_file=LOGGING, workflow_type="train", **overrides)
    check_workflow(workflow)
    adapter = json.loads((trained / "ft_model" / "adapter_config.json").read_text())
    assert adapter["r"] == 8
    from radfm3d.engine.training import has_lora, load_trained_model

    assert has_lora(load_trained_model(trained / "ft_model"))


@pytest.mark.slow
def test_multi_gpu_train_two_cpu_processes(workdir: Path, tmp_path: Path):
    overrides = {**_train_overrides(workdir), "output_dir": str(tmp_path / "run"), "model_dir": str(tmp_path / "m")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run",
           "--config_file", str([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")]),
           "--meta_file", META, "--logging_file", LOGGING]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 4 records over 2 ranks, batch 2 -> 1 iteration per epoch; rank 0 saved the checkpoint and the model
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_00000001.pt").is_file()
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_pretrain_vision_then_instruction_from_it(workdir: Path, tmp_path: Path):
    """pretrain_vision.json (structured labels of cases.jsonl, LLM untouched) exports a full model; train.json starts
    from it with the vision encoder and resampler frozen, reading scans through the preprocessed-image cache."""
    import torch

    from radfm3d.engine.training import build_model, load_trained_model

    pre_dir, cache = tmp_path / "vision_pretrained", tmp_path / "cache"
    overrides = {**_train_overrides(workdir), "output_dir": str(tmp_path / "pre"), "model_dir": str(pre_dir),
                 "cache_dir": str(cache), "val_split": "train", "val_interval": 1, "batch_size": 2,
                 "load_text_weights": "false", "max_minutes": 30}  # both switches as typed on a command line
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "pretrain_vision.json")],
                              meta_file=META, logging_file=LOGGING, workflow_type="train", **overrides)
    check_workflow(workflow)
    assert workflow.trainer.state.metrics["val_modality_acc"] >= 0.0  # the validation handler ran
    assert (pre_dir / "structured_head.safetensors").is_file() and list(cache.rglob("*.safetensors"))
    fresh, pretrained = build_model("tiny", seed=0), load_trained_model(pre_dir)
    vision_key = "vision_model.patch_embedding.proj.weight"
    moved = dict(pretrained.named_parameters())[vision_key]
    assert not torch.equal(moved, dict(fresh.named_parameters())[vision_key])  # the encoder trained
    llm_key = next(k for k, _ in fresh.named_parameters() if k.startswith("language_model."))
    assert torch.equal(dict(pretrained.named_parameters())[llm_key], dict(fresh.named_parameters())[llm_key])

    # the findings prompt (the stage-0 heads' reading as text after the visual tokens) between the two stages
    from radfm3d.cli import main as radfm3d_main

    prompted = tmp_path / "with_findings_prompt"
    assert radfm3d_main(["findings-prompt", str(pre_dir), "--out", str(prompted), "--num-tokens", "120"]) == 0
    overrides = {**_train_overrides(workdir), "model_name_or_path": str(prompted), "output_dir": str(tmp_path / "ins"),
                 "model_dir": str(tmp_path / "instructed"), "train_vision": "false", "train_resampler": "false",  # as typed on a command line
                 "image_cache_dir": str(cache)}
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), meta_file=META, logging_file=LOGGING,
                              workflow_type="train", **overrides)
    check_workflow(workflow)
    instructed = dict(load_trained_model(tmp_path / "instructed").named_parameters())
    assert torch.equal(instructed[vision_key], moved)  # frozen in the instruction stage
    assert any(k.startswith("resampler.") for k in instructed)
    assert any(k.startswith("reader.head.") for k in instructed)

    record = json.loads((workdir / "phantoms" / "val.jsonl").read_text().splitlines()[0])
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "ct.nii.gz").write_bytes((workdir / "phantoms" / record["images"][0]).read_bytes())
    overrides = {"bundle_root": str(BUNDLE), "model_dir": str(tmp_path / "instructed"), "dataset_dir": str(scans),
                 "output_dir": str(tmp_path / "out"), "max_new_tokens": 2, "prompts": ["Which modality?"]}
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), meta_file=META, logging_file=LOGGING,
                              workflow_type="infer", **overrides)
    check_workflow(workflow)
    written = json.loads((tmp_path / "out" / "ct.json").read_text())
    reading = written["image_reading"]
    assert reading["text"].startswith("Image reading: ") and reading["region"] in ("head", "chest", "abdomen")
    assert written["box_snapping"] is False  # the bundle's tiny model was not given box snapping

    # a new threshold for the instructed model's reader (its head, the LLM side and the slots unchanged)
    with_threshold = tmp_path / "with_threshold"
    assert radfm3d_main(["findings-prompt", str(tmp_path / "instructed"), "--out", str(with_threshold), "--replace",
                         "--threshold", "0.7"]) == 0
    swapped = dict(load_trained_model(with_threshold).named_parameters())
    assert all(torch.equal(v, swapped[k]) for k, v in instructed.items())  # the rest is the instructed model
    table = tmp_path / "reading.json"
    assert radfm3d_main(["reading-threshold", str(with_threshold), "--cases", str(workdir / "phantoms" / "cases.jsonl"),
                         "--split", "all", "--cache", str(cache), "--json", str(table)]) == 0
    rows = json.loads(table.read_text())
    assert rows["sites"] > 0 and len(rows["table"]) == 7 and 0.0 <= rows["best"]["exact"] <= 1.0
    overrides = {"bundle_root": str(BUNDLE), "model_dir": str(with_threshold), "dataset_dir": str(scans),
                 "output_dir": str(tmp_path / "out_threshold"), "max_new_tokens": 2, "prompts": ["Which modality?"]}
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), meta_file=META, logging_file=LOGGING,
                              workflow_type="infer", **overrides)
    check_workflow(workflow)
    assert json.loads((tmp_path / "out_threshold" / "ct.json").read_text())["image_reading"]["text"].startswith(
        "Image reading: ")
