# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadFM at official scale, measured: a random RadFM-layout checkpoint loaded in bf16, int8 and offloaded.

Run: ``python -m benchmarks.bench_radfm_scale [--scale 13b|small] [--layers N --hidden N ...] [--device cuda]``
-> ``benchmarks/results/radfm_scale_<scale>.json`` and ``.md`` (``--output``). Steps, printed with elapsed times:

1. write: a randomly initialised ``pytorch_model.bin`` with the official RadFM key tree at the chosen scale
   (``radfm3d.interop.synthetic.write_radfm_checkpoint``: tensor by tensor straight to disk, never the whole model
   in memory; bf16 by default: 26.5 GB at 13B instead of the official file's 53 GB fp32). Peak RSS printed.
2. convert: ``radfm3d convert-radfm`` (its conversion report: seconds, peak RSS).
3. one run per load mode (``--modes``): ``bf16``; ``int8`` (CUDA: bitsandbytes LLM.int8 through
   ``quantization_config``; CPU: bf16 load, then PyTorch dynamic int8 of the decoder Linears one at a time, the rest
   of the LLM in fp32); ``offload``
   (``device_map="auto"`` under ``max_memory`` = ``--max-memory``, 24 GB by default: on CUDA the rest of the LLM
   sits in CPU RAM, on the CPU it goes to an offload folder on disk). Per mode: load time, resident weights,
   peak memory (CUDA ``max_memory_allocated``; on the CPU the process's peak RSS, ``VmHWM``), and at batch 1 and
   batch 8 (one random 3D scan + a prompt per sample, left-padded): time to first token (``generate`` with one new
   token, image encoding and prefill included), the time of ``--new-tokens`` greedy tokens and tokens/s, and the
   argmax agreement with bf16 (teacher-forced next-token argmax over bf16's prompt + generated tokens, every
   attended position). bf16's own row compares two forward passes (1.0 unless the kernels are non-deterministic).
   A mode that runs out of memory is reported as "did not fit" with the step where it failed.

Each step runs in its own process by default (clean peak memory per mode); ``--in-process`` runs everything in
this process (peak RSS reset between steps through ``/proc/self/clear_refs``; what the test suite uses at small
scale). Random weights: the timings and memory are those of the real architecture; answers are meaningless and
the agreement figures measure numeric drift on random weights, not on trained ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"

#: named scales: RadFMDims overrides and the scan size (H, W, D) of the benchmark inputs
SCALES: dict[str, dict[str, Any]] = {
    # RadFM-13B as released: LLaMA-13B (5120 wide, 40 layers, 32000 vocab) + the 12-layer 768-wide ViT; the scan is
    # RadFM's 3D training resolution (256 x 256 x 32 -> 512 patch tokens)
    "13b": {"dims": {}, "scan": (256, 256, 32)},
    # a few hundred MB: 512-wide 8-layer LLaMA with the full 32000 vocabulary, small vision side (CPU test suite)
    "small": {"dims": {"hidden": 512, "intermediate": 1408, "llm_layers": 8, "llm_heads": 8, "patch": (16, 16, 4),
                       "vis_dim": 192, "pos_feats": 64, "vit_depth": 2, "vit_heads": 4, "vit_dim_head": 32,
                       "vit_mlp": 512, "perceiver_depth": 2, "perceiver_heads": 4, "perceiver_dim_head": 32,
                       "bert_hidden": 64, "bert_layers": 2, "bert_vocab": 1000},
              "scan": (64, 64, 16)},
}
MODES = ("bf16", "int8", "offload")
BATCHES = (1, 8)


def _log(start: float, text: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {text}", flush=True)


# ----------------------------------------------------------------------------- memory probes
def peak_rss() -> int:
    from radfm3d.interop.radfm import peak_rss_bytes

    return peak_rss_bytes()


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux ``clear_refs`` 5); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _gb(n: float | int | None) -> float | None:
    return None if n is None else round(n / 1e9, 3)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return any(s in text for s in ("out of memory", "not enough memory", "cannot allocate memory",
                                   "defaultcpuallocator", "no device has enough memory"))


# ----------------------------------------------------------------------------- inputs
def make_inputs(config: dict[str, Any], scan: tuple[int, int, int], prompt_tokens: int, seed: int = 0
                ) -> dict[int, dict[str, torch.Tensor]]:
    """Per batch size b: ``input_ids``/``attention_mask`` (b, L) left-padded (prompt lengths differ), each prompt
    = BOS, text ids, one image block (start, ``num_image_tokens`` placeholders, end) after the 4th token, more text;
    ``pixel_values`` (b, 1, 3, H, W, D) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(config["text_config"]["vocab_size"])
    n_img = int(config["num_image_tokens"])
    start, end, pad_id = vocab, vocab + 1, vocab + 2  # converted RadFM: base vocabulary + start/end/placeholder
    out: dict[int, dict[str, torch.Tensor]] = {}
    for b in BATCHES:
        rows = []
        for i in range(b):
            n_text = max(4, prompt_tokens - 3 * i)
            text = torch.randint(3, vocab, (n_text,), generator=gen).tolist()
            rows.append([1, *text[:3], start, *[pad_id] * n_img, end, *text[3:]])
        length = max(map(len, rows))
        ids = torch.zeros(b, length, dtype=torch.long)
        mask = torch.zeros(b, length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, length - len(row):] = torch.tensor(row)
            mask[i, length - len(row):] = 1
        out[b] = {"input_ids": ids, "attention_mask": mask,
                  "pixel_values": torch.rand(b, 1, 3, *scan, generator=gen)}
    return out


# ----------------------------------------------------------------------------- one load mode
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_model(mode: str, model_dir: Path, device: str, max_memory: str, cpu_memory: str, offload_dir: Path) -> Any:
    """The converted model in ``mode`` on ``device`` (see the module docstring)."""
    from radfm3d.modeling import RadFM3DForCausalLM

    cuda = device == "cuda"
    if mode == "bf16":
        return RadFM3DForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                  device_map={"": 0} if cuda else None)
    if mode == "int8":
        if cuda:
            from radfm3d.interop.quantize import bnb_int8_config

            return RadFM3DForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0},
                                                      quantization_config=bnb_int8_config())
        from radfm3d.interop.quantize import quantize_llm_dynamic_int8

        model = RadFM3DForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        return quantize_llm_dynamic_int8(model, upcast=True)  # peak: the bf16 model + one fp32 Linear
    if mode == "offload":
        budget: dict[Any, str] = {0: max_memory, "cpu": cpu_memory} if cuda else {"cpu": max_memory}
        offload_dir.mkdir(parents=True, exist_ok=True)
        return RadFM3DForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto",
                                                  max_memory=budget, offload_folder=str(offload_dir))
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def _import_loaders(mode: str, device: str) -> None:
    """Import what loading ``mode`` uses and start CUDA, so that the load time is the load alone."""
    import accelerate  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    from radfm3d.modeling import RadFM3DForCausalLM  # noqa: F401

    if device == "cuda":
        torch.zeros(1, device="cuda")
        if mode == "int8":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                pass  # bnb_int8_config reports it
    elif mode == "int8":
        from torch.ao.quantization import quantize_dynamic  # noqa: F401


def _placement(model: Any) -> dict[str, int]:
    """LLM weight bytes per device of accelerate's device map (``{"0": 22.9e9, "cpu": 3.2e9}``); one entry for a
    model on one device. Offloaded weights are counted by shape and dtype (their parameters sit on ``meta``)."""
    llm = model.language_model
    device_map = getattr(llm, "hf_device_map", None) or {"": str(llm.get_input_embeddings().weight.device)}
    placed: dict[str, int] = {}
    for name, where in device_map.items():
        module = llm.get_submodule(name) if name else llm
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        placed[str(where)] = placed.get(str(where), 0) + int(size)
    return placed


def run_mode(mode: str, model_dir: Path, inputs_path: Path, reference_path: Path, device: str, new_tokens: int,
             max_memory: str, cpu_memory: str, offload_dir: Path, start: float | None = None) -> dict[str, Any]:
    """Load ``mode``, then per batch size: time to first token, generation, teacher-forced argmax agreement.
    The bf16 run writes ``reference_path`` (its generated sequences and argmax); the others read it."""
    from radfm3d.interop.quantize import module_bytes

    start = time.perf_counter() if start is None else start
    cuda = device == "cuda"
    row: dict[str, Any] = {"mode": mode, "device": device, "status": "ok"}
    stage = "load"
    model = None
    _import_loaders(mode, device)  # library imports and CUDA start-up stay outside the load time
    reset_peak_rss()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row["baseline_rss_bytes"] = current_rss()  # interpreter + libraries, before the model
    try:
        _log(start, f"{mode}: loading")
        t0 = time.perf_counter()
        model = load_model(mode, model_dir, device, max_memory, cpu_memory, offload_dir)
        _sync(device)
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["placement"] = _placement(model)
        row["weights_bytes"] = module_bytes(model)
        if cuda:
            row["device_weights_bytes"] = torch.cuda.memory_allocated()
            row["load_peak_device_bytes"] = torch.cuda.max_memory_allocated()
        row["load_peak_rss_bytes"] = peak_rss()
        _log(start, f"{mode}: loaded in {row['load_s']} s, placement {row['placement']}")
        here = model.language_model.get_input_embeddings().weight.device
        if here.type == "meta":  # offloaded embeddings: accelerate's hooks run them on the execution device
            here = torch.device("cuda", 0) if cuda else torch.device("cpu")
        inputs = torch.load(inputs_path, weights_only=True)
        # without a bf16 run (not asked for, or it did not fit) there is nothing to agree with
        has_reference = mode != "bf16" and reference_path.is_file()
        reference = torch.load(reference_path, weights_only=True) if has_reference else {}
        produced: dict[str, Any] = {}
        kw = {"do_sample": False}
        with torch.no_grad():
            stage = "warm-up"
            one = {k: v.to(here) for k, v in inputs[1].items()}
            model.generate(**one, max_new_tokens=1, **kw)
            for b in BATCHES:
                stage = f"batch {b}"
                batch = {k: v.to(here) for k, v in inputs[b].items()}
                _sync(device)
                t0 = time.perf_counter()
                model.generate(**batch, max_new_tokens=1, **kw)
                _sync(device)
                ttft = time.perf_counter() - t0
                t0 = time.perf_counter()
                seqs = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                _sync(device)
                gen_s = time.perf_counter() - t0
                prompt = batch["input_ids"].shape[1]
                entry: dict[str, Any] = {
                    "prompt_tokens": int(prompt), "new_tokens": new_tokens, "ttft_s": round(ttft, 3),
                    "generate_s": round(gen_s, 3), "tokens_per_s": round(b * new_tokens / gen_s, 2),
                    "decode_tokens_per_s": round(b * (new_tokens - 1) / max(gen_s - ttft, 1e-9), 2),
                    "answers": int(seqs.shape[0]),
                }
                # teacher-forced argmax over bf16's prompt + generated tokens
                ref_seqs = reference[f"seq{b}"].to(here) if has_reference else seqs
                mask = torch.cat([batch["attention_mask"],
                                  torch.ones(b, ref_seqs.shape[1] - prompt, dtype=torch.long, device=here)], dim=1)
                argmax = model(input_ids=ref_seqs, attention_mask=mask,
                               pixel_values=batch["pixel_values"]).logits.argmax(-1).cpu()
                attended = mask.bool().cpu()
                if mode == "bf16":
                    again = model(input_ids=ref_seqs, attention_mask=mask,
                                  pixel_values=batch["pixel_values"]).logits.argmax(-1).cpu()
                    entry["argmax_agreement"] = round(float((again == argmax)[attended].float().mean()), 4)
                    entry["same_new_tokens"] = 1.0
                    produced[f"seq{b}"] = seqs.cpu()
                    produced[f"argmax{b}"] = argmax
                elif not has_reference:
                    entry["argmax_agreement"] = entry["same_new_tokens"] = None
                else:
                    ref_argmax = reference[f"argmax{b}"]
                    entry["argmax_agreement"] = round(float((argmax == ref_argmax)[attended].float().mean()), 4)
                    new_ref = reference[f"seq{b}"][:, prompt:]
                    entry["same_new_tokens"] = round(float((seqs[:, prompt:].cpu() == new_ref).float().mean()), 4)
                if cuda:
                    entry["peak_device_bytes"] = torch.cuda.max_memory_allocated()
                entry["peak_rss_bytes"] = peak_rss()
                row[f"batch_{b}"] = entry
                _log(start, f"{mode}: batch {b}: ttft {entry['ttft_s']} s, {entry['tokens_per_s']} tokens/s, "
                     f"agreement {entry['argmax_agreement']}")
        if mode == "bf16":
            torch.save(produced, reference_path)
    except Exception as err:  # noqa: BLE001 - a mode that fails is reported, the benchmark goes on
        row["status"] = "did not fit" if _is_oom(err) else "error"
        row["failed_at"] = stage
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        _log(start, f"{mode}: {row['status']} at {stage}: {row['error']}")
    finally:
        if cuda:
            row["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_rss_bytes"] = peak_rss()
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- steps
def build_dims(args: argparse.Namespace) -> Any:
    from radfm3d.interop.synthetic import RadFMDims

    values = dict(SCALES[args.scale]["dims"])
    for name, field in (("layers", "llm_layers"), ("hidden", "hidden"), ("intermediate", "intermediate"),
                        ("heads", "llm_heads"), ("vocab", "vocab")):
        if getattr(args, name) is not None:
            values[field] = getattr(args, name)
    if args.hidden is not None and args.intermediate is None:  # LLaMA's ratio, rounded up to a multiple of 256
        values["intermediate"] = -(-int(args.hidden * 8 / 3) // 256) * 256
    if args.hidden is not None and args.heads is None:
        values["llm_heads"] = max(1, args.hidden // 128)
    return RadFMDims(**values)


def step_write(args: argparse.Namespace, dims: Any, source: Path) -> dict[str, Any]:
    from radfm3d.interop.synthetic import write_radfm_checkpoint

    reset_peak_rss()
    return write_radfm_checkpoint(source, dims, dtype=getattr(torch, args.source_dtype), seed=args.seed,
                                  llm_std=0.02, device=args.init_device, chunk_bytes=int(args.write_chunk_mb * 2**20),
                                  progress=not args.no_progress)


def step_convert(args: argparse.Namespace, source: Path, config_path: Path, model_dir: Path) -> dict[str, Any]:
    """``radfm3d convert-radfm`` (the CLI's own entry point; its own process unless ``--in-process``)."""
    argv = [str(source), str(model_dir), "--config", str(config_path), "--dtype", "bfloat16", "--overwrite"]
    if args.no_progress:
        argv.append("--no-progress")
    if args.in_process:
        from radfm3d.interop.radfm import cli

        reset_peak_rss()
        if cli(argv) != 0:
            raise SystemExit("convert-radfm failed")
    else:
        subprocess.run([sys.executable, "-m", "radfm3d.cli", "convert-radfm", *argv], check=True)
    report = json.loads((model_dir / "conversion_report.json").read_text())
    return {k: report[k] for k in ("seconds", "read_mb_per_s", "written_bytes", "peak_rss_bytes",
                                   "peak_rss_bound_bytes")} | {"parameters": report["kept"]["parameters"]}


def _worker_command(args: argparse.Namespace, step: str) -> list[str]:
    """This benchmark's own command line, for one step in its own process (``--worker STEP --work DIR``)."""
    return [sys.executable, "-m", "benchmarks.bench_radfm_scale", *args.argv, "--worker", step, "--work",
            str(args.work)]


def _run_worker(args: argparse.Namespace, step: str, timeout: float | None = None) -> dict[str, Any] | None:
    """Run one step in its own process; its result (``row_STEP.json``) or ``None`` plus the exit code."""
    out = args.work / f"row_{step}.json"
    out.unlink(missing_ok=True)
    done = subprocess.run(_worker_command(args, step), timeout=timeout, cwd=ROOT)
    args.last_returncode = done.returncode
    return json.loads(out.read_text()) if out.is_file() else None


def step_mode(args: argparse.Namespace, mode: str, paths: dict[str, Path], start: float) -> dict[str, Any]:
    if args.in_process:
        return run_mode(mode, paths["model"], paths["inputs"], paths["reference"], args.device, args.new_tokens,
                        args.max_memory, args.cpu_memory, paths["offload"], start)
    try:
        row = _run_worker(args, mode, args.mode_timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "device": args.device, "status": "timed out",
                "error": f"no result within --mode-timeout {args.mode_timeout} s"}
    if row is not None:
        return row
    code = args.last_returncode
    killed = code < 0 or code == 137
    return {"mode": mode, "device": args.device, "status": "did not fit" if killed else "error",
            "error": f"worker exited with {code}" + (" (killed: out of host memory?)" if killed else "")}


# ----------------------------------------------------------------------------- report
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The results table (GB = 1e9 bytes)."""
    cuda = report["device"] == "cuda"
    mem = "peak GPU memory (GB)" if cuda else "peak RSS (GB)"
    lines = [
        f"# RadFM scale benchmark: {report['scale']} ({report['parameters'] / 1e9:.3f} B parameters), "
        f"{report['device']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"write: {_gb(report['write']['bytes'])} GB in {report['write']['seconds']} s, peak RSS "
        f"{_gb(report['write']['peak_rss_bytes'])} GB; convert-radfm: {report['convert']['seconds']} s, peak RSS "
        f"{_gb(report['convert']['peak_rss_bytes'])} GB (bound {_gb(report['convert']['peak_rss_bound_bytes'])} GB)",
        "",
        f"| mode | status | load (s) | weights (GB) | arithmetic (GB) | {mem} b1 / b8 | TTFT b1 / b8 (s) | "
        "tokens/s b1 / b8 | argmax agreement with bf16 b1 / b8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    arithmetic = {r["mode"]: r["gpu_bytes"] for r in report["arithmetic"]}
    for row in report["modes"]:
        b1, b8 = row.get("batch_1", {}), row.get("batch_8", {})
        key = "peak_device_bytes" if cuda else "peak_rss_bytes"
        status = row["status"] if row["status"] == "ok" else f"{row['status']} ({row.get('failed_at', '')}) "
        lines.append(
            f"| {row['mode']} | {status.strip()} | {_fmt(row.get('load_s'))} | "
            f"{_fmt(_gb(row.get('device_weights_bytes' if cuda else 'weights_bytes')), 3)} | "
            f"{_fmt(_gb(arithmetic.get(row['mode'])), 3)} | "
            f"{_fmt(_gb(b1.get(key)), 3)} / {_fmt(_gb(b8.get(key)), 3)} | "
            f"{_fmt(b1.get('ttft_s'), 3)} / {_fmt(b8.get('ttft_s'), 3)} | {_fmt(b1.get('tokens_per_s'))} / "
            f"{_fmt(b8.get('tokens_per_s'))} | {_fmt(b1.get('argmax_agreement'), 4)} / "
            f"{_fmt(b8.get('argmax_agreement'), 4)} |")
    baselines = [r["baseline_rss_bytes"] for r in report["modes"] if r.get("baseline_rss_bytes")]
    lines += ["", "weights: bytes of the loaded parameters " + ("on the GPU" if cuda else "held in RAM (offload: "
              "the part not on disk)") + "; arithmetic: `radfm3d.interop.quantize.memory_table` (weights only, "
              "offload with 0 resident layers)" + ("" if cuda or not baselines else
              f"; peak RSS is the whole process (interpreter and libraries before loading: "
              f"{_gb(min(baselines))}" + (f"-{_gb(max(baselines))}" if _gb(max(baselines)) != _gb(min(baselines))
                                           else "") + " GB)") +
              ". Random weights: the agreement is numeric drift, not answer quality."]
    if cuda:
        fits = [r["mode"] for r in report["modes"] if r["status"] == "ok"
                and r.get("batch_1", {}).get("peak_device_bytes", float("inf")) <= report["budget_bytes"]]
        lines.append(f"Within the {report['max_memory']} budget at batch 1 (peak allocated, CUDA context not "
                     f"counted): {', '.join(fits) or 'none'}.")
    return "\n".join(lines) + "\n"


def _parse_size(text: str) -> int:
    from radfm3d.interop.radfm import parse_size

    return parse_size(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="13b", help="named dimensions (default 13b)")
    parser.add_argument("--layers", type=int, help="LLM decoder layers (overrides the scale)")
    parser.add_argument("--hidden", type=int, help="LLM width (intermediate and heads follow unless given)")
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--scan", help="scan size H,W,D (default: the scale's)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text tokens of the longest prompt")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per answer")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-memory", default="24GB", help="device budget of the offload mode (default 24GB)")
    parser.add_argument("--cpu-memory", default="200GiB", help="CPU RAM budget of the offload mode on CUDA")
    parser.add_argument("--source-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the synthetic pytorch_model.bin (the official file is float32)")
    parser.add_argument("--init-device", default=None, help="where the random weights are drawn (default --device)")
    parser.add_argument("--write-chunk-mb", type=float, default=64.0,
                        help="fp32 MiB drawn at a time while writing the checkpoint (default 64)")
    parser.add_argument("--work", type=Path, help="folder for the checkpoints (default: a temporary folder)")
    parser.add_argument("--source-dir", type=Path, help="folder for the synthetic pytorch_model.bin (default --work)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --work")
    parser.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/radfm_scale_<scale>.json); "
                        "the table goes beside it as .md")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="all steps in this process (faster start-up)")
    parser.add_argument("--mode-timeout", type=float, default=None, help="seconds per mode (own process only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.init_device = args.init_device or args.device
    args.output = args.output or RESULTS_DIR / f"radfm_scale_{args.scale}.json"
    if args.worker:  # one step in its own process; the paths follow --work
        from radfm3d.utils import atomic_write_text

        work = args.work
        if args.worker == "write":
            row = step_write(args, build_dims(args), (args.source_dir or work) / "pytorch_model.bin")
        else:
            row = run_mode(args.worker, work / "model", work / "inputs.pt", work / "reference.pt", args.device,
                           args.new_tokens, args.max_memory, args.cpu_memory, work / "offload")
        atomic_write_text(work / f"row_{args.worker}.json", json.dumps(row))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {MODES}")
    if "bf16" in modes:
        modes = ["bf16"] + [m for m in modes if m != "bf16"]  # the reference runs first

    from radfm3d.interop.quantize import memory_table
    from radfm3d.modeling.configuration import RadFM3DConfig
    from radfm3d.utils import atomic_write_text

    start = time.perf_counter()
    dims = build_dims(args)
    config = dims.radfm3d_config()
    scan = tuple(int(s) for s in args.scan.split(",")) if args.scan else SCALES[args.scale]["scan"]
    temp = None
    if args.work is None:
        import tempfile

        temp = Path(tempfile.mkdtemp(prefix="radfm_scale_"))
    work = args.work or temp
    work.mkdir(parents=True, exist_ok=True)
    args.work = work
    source_dir = args.source_dir or work
    source_dir.mkdir(parents=True, exist_ok=True)
    paths = {"work": work, "source": source_dir / "pytorch_model.bin", "config": work / "radfm_config.json",
             "model": work / "model", "inputs": work / "inputs.pt", "reference": work / "reference.pt",
             "offload": work / "offload"}
    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.bench_radfm_scale", *args.argv]),
        "scale": args.scale, "dims": dims.to_dict(), "scan": list(scan), "device": args.device,
        "max_memory": args.max_memory, "budget_bytes": _parse_size(args.max_memory),
        "source_dtype": args.source_dtype, "new_tokens": args.new_tokens,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
    }
    try:
        paths["config"].write_text(json.dumps(config))
        report["arithmetic"] = memory_table(RadFM3DConfig(**config))
        report["parameters"] = next(r["gpu_bytes"] for r in report["arithmetic"] if r["mode"] == "parameters")
        _log(start, f"scale {args.scale}: {report['parameters'] / 1e9:.3f} B parameters kept; writing "
                    f"{paths['source']} ({args.source_dtype})")
        if args.in_process:
            report["write"] = step_write(args, dims, paths["source"])
        else:
            written = _run_worker(args, "write")
            if written is None:
                raise SystemExit(f"writing the synthetic checkpoint failed (exit {args.last_returncode})")
            report["write"] = written
        _log(start, f"wrote {_gb(report['write']['bytes'])} GB in {report['write']['seconds']} s, peak RSS "
                    f"{_gb(report['write']['peak_rss_bytes'])} GB; converting with radfm3d convert-radfm")
        report["convert"] = step_convert(args, paths["source"], paths["config"], paths["model"])
        _log(start, f"converted in {report['convert']['seconds']} s, peak RSS "
                    f"{_gb(report['convert']['peak_rss_bytes'])} GB")
        if not args.keep:
            paths["source"].unlink()  # the model folder alone from here on (disk: 13B = 26.6 + 26.3 GB at the peak)
        torch.save(make_inputs(config, scan, args.prompt_tokens, args.seed), paths["inputs"])
        paths["reference"].unlink(missing_ok=True)  # written by this run's bf16 mode only
        report["modes"] = []
        for mode in modes:
            report["modes"].append(step_mode(args, mode, paths, start))
    finally:
        if not args.keep:
            paths["source"].unlink(missing_ok=True)
            for name in ("model", "offload"):
                shutil.rmtree(paths[name], ignore_errors=True)
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.output.with_suffix(".md"), table)
    print(table)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
