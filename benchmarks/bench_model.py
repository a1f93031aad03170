# Copyright (c) radfm3d contributors. Apache-2.0.
"""Model benchmarks (not part of the test run): vision throughput, generation overhead, interleaving memory.

Run: ``.venv/bin/python -m benchmarks.bench_model [--quick]`` -> ``benchmarks/results/model.json``.

1. Vision encoder throughput at the ``demo`` preset (volumes/s, 3x128x128x32 in, eval, no grad): ViT alone
   and the whole image path (ViT + resampler + projector).
2. Generation: ``RadFM3DForCausalLM.generate`` with 1 and 8 image+prompt pairs (demo preset, real SmolLM2
   base) against the bare LLM's own ``generate`` on prompts of the same length and the same number of new
   tokens (greedy, ``min_new_tokens == max_new_tokens``). Ratio of times; batched throughput vs batch 1.
3. Interleaving at RadFM scale (sequence 2048, vocabulary 32000, width 5120, fp32, 10 images x 32 tokens):
   our embedding lookup + masked scatter against RadFM's ``one_hot(ids) @ cat(table, image rows, visual rows)``.
   Each method runs in its own subprocess. Extra memory = peak bytes of live tensors created by the op
   (tracked exactly with a ``TorchDispatchMode``; the shared machine swaps, so RSS is only reported as a
   secondary figure), time = best of 3.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "model.json"


def _best_time(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ----------------------------------------------------------------------------- 1. vision throughput
def bench_vision(model: Any, batch: int = 4, repeat: int = 3) -> dict[str, Any]:
    px = torch.rand(batch, 3, 128, 128, 32)
    with torch.no_grad():
        model.vision_model(px[:1])  # warm-up
        t_vit = _best_time(lambda: model.vision_model(px), repeat)
        t_all = _best_time(lambda: model.get_image_features(px.unsqueeze(1)), repeat)
    vision = model.config.vision
    return {
        "input": [3, 128, 128, 32],
        "patch_tokens": int(torch.tensor(vision.grid((128, 128, 32))).prod()),
        "batch": batch,
        "vit_volumes_per_s": round(batch / t_vit, 2),
        "image_path_volumes_per_s": round(batch / t_all, 2),
        "vit_parameters_M": round(sum(p.numel() for p in model.vision_model.parameters()) / 1e6, 3),
    }


# ----------------------------------------------------------------------------- 2. generation
def _prompts(model: Any, tokenizer: Any, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n left-padded image+question prompts (different lengths) and pixel values (n, 1, 3, 128, 128, 32)."""
    cfg = model.config
    questions = ["Describe the scan.", "Is there a lesion in the left lung?", "Which organ is shown?",
                 "Report the main finding in one sentence.", "Is the study normal?", "Where is the mass?",
                 "What modality is this?", "List the abnormalities you can see in this volume."]
    rows = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        image = [cfg.image_start_token_id] + [cfg.image_token_id] * cfg.num_image_tokens + [cfg.image_end_token_id]
        rows.append(ids[:3] + image + ids[3:])  # image right after "<|im_start|>user\n"
    length = max(map(len, rows))
    pad = model.language_model.generation_config.pad_token_id or 0
    input_ids = torch.full((n, length), pad, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    text_only = input_ids.masked_fill(input_ids >= cfg.base_vocab_size, 28)  # same length, plain text ids
    return input_ids, mask, torch.rand(n, 1, 3, 128, 128, 32), text_only


def bench_generation(model: Any, tokenizer: Any, new_tokens: int = 32, repeat: int = 3) -> dict[str, Any]:
    """Ours and the bare LLM alternate within each repetition (the machine is shared: best of ``repeat``)."""
    out: dict[str, Any] = {"new_tokens": new_tokens, "repeat": repeat}
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for n in (1, 8):
        ids, mask, px, text_only = _prompts(model, tokenizer, n)
        ours, bare, encode = [], [], []
        with torch.no_grad():
            model.generate(ids[:1], attention_mask=mask[:1], pixel_values=px[:1], max_new_tokens=2)  # warm-up
            for _ in range(repeat):
                encode.append(_best_time(lambda: model.embed_inputs(ids, px), 1))
                ours.append(_best_time(lambda: model.generate(ids, attention_mask=mask, pixel_values=px, **kw), 1))
                bare.append(_best_time(
                    lambda: model.language_model.generate(input_ids=text_only, attention_mask=mask, **kw), 1))
        t_ours, t_bare, t_enc = min(ours), min(bare), min(encode)
        out[f"batch_{n}"] = {
            "prompt_tokens": int(ids.shape[1]),
            "ours_s": round(t_ours, 3),
            "bare_llm_s": round(t_bare, 3),
            "image_encode_s": round(t_enc, 3),
            "ratio_ours_over_bare": round(t_ours / t_bare, 3),
            "ratio_without_image_encode": round((t_ours - t_enc) / t_bare, 3),
            "ours_tokens_per_s": round(n * new_tokens / t_ours, 1),
            "bare_tokens_per_s": round(n * new_tokens / t_bare, 1),
            "all_ours_s": [round(t, 2) for t in ours],
            "all_bare_s": [round(t, 2) for t in bare],
        }
    out["batched_throughput_over_batch1"] = round(
        out["batch_8"]["ours_tokens_per_s"] / out["batch_1"]["ours_tokens_per_s"], 2)
    return out


# ----------------------------------------------------------------------------- 3. interleaving memory
def _interleave_worker(method: str, seq: int, vocab: int, width: int, images: int, tokens: int) -> dict[str, Any]:
    """Runs inside a fresh interpreter: set up the table, then measure one method's peak extra RSS and time."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(vocab, width)  # the LLM's input embedding (fp32)
    figure = torch.randn(2, width)  # <image>, </image> rows
    visual = torch.randn(images * tokens, width)  # projected visual tokens of the sample
    ids = torch.randint(0, vocab, (1, seq))
    n_vis = images * tokens
    # RadFM layout: <image> v_0..v_{k} </image> blocks at the start of the text
    pos = 0
    for i in range(images):
        ids[0, pos] = vocab
        ids[0, pos + 1 : pos + 1 + tokens] = vocab + 2 + torch.arange(i * tokens, (i + 1) * tokens)
        ids[0, pos + 1 + tokens] = vocab + 1
        pos += tokens + 2
    extra = torch.nn.Embedding(3, width)  # ours: start, end, placeholder rows
    ours_ids = ids.clone()
    ours_ids[ours_ids >= vocab + 2] = vocab + 2
    placeholder = vocab + 2

    def ours() -> torch.Tensor:
        with torch.no_grad():
            is_extra = ours_ids >= vocab
            emb = table(ours_ids.clamp(max=vocab - 1))
            emb = emb.masked_scatter(is_extra.unsqueeze(-1), extra(ours_ids[is_extra] - vocab))
            return emb.masked_scatter((ours_ids == placeholder).unsqueeze(-1), visual)

    def one_hot() -> torch.Tensor:
        with torch.no_grad():
            full = torch.cat([table.weight, figure, visual])  # per-sample table, as RadFM builds it
            return torch.nn.functional.one_hot(ids, full.shape[0]).to(full.dtype) @ full

    fn = ours if method == "scatter" else one_hot
    seconds = _best_time(fn, 3)
    tracker = _PeakTensorBytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tracker:
        result = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    return {"extra_peak_MiB": round(tracker.peak / 2**20, 1), "rss_peak_delta_MiB": round((peak - before) / 1024, 1),
            "seconds": round(seconds, 4)}


class _PeakTensorBytes:
    """Context manager: peak bytes of tensors created inside it and still alive (a TorchDispatchMode that
    counts every new output storage and releases it when the tensor object is collected)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def __enter__(self) -> _PeakTensorBytes:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        def release(ptr: int, nbytes: int) -> None:
            if ptr in tracker._live:
                tracker._live.discard(ptr)
                tracker.current -= nbytes

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                        if ptr not in tracker._live:
                            tracker._live.add(ptr)
                            tracker.current += nbytes
                            tracker.peak = max(tracker.peak, tracker.current)
                            weakref.finalize(t, release, ptr, nbytes)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


def bench_interleave(seq: int = 2048, vocab: int = 32000, width: int = 5120, images: int = 10, tokens: int = 32
                     ) -> dict[str, Any]:
    results: dict[str, Any] = {"seq": seq, "vocab": vocab, "width": width, "images": images,
                               "tokens_per_image": tokens, "dtype": "float32",
                               "table_MiB": round(vocab * width * 4 / 2**20, 1)}
    for method in ("scatter", "one_hot"):
        code = (f"import json, benchmarks.bench_model as b; print(json.dumps(b._interleave_worker("
                f"{method!r}, {seq}, {vocab}, {width}, {images}, {tokens})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[method].pop("check", None)
    results["memory_ratio_one_hot_over_scatter"] = round(
        results["one_hot"]["extra_peak_MiB"] / max(results["scatter"]["extra_peak_MiB"], 1e-3), 1)
    results["time_ratio_one_hot_over_scatter"] = round(
        results["one_hot"]["seconds"] / max(results["scatter"]["seconds"], 1e-6), 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (CI smoke)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["vision", "generation", "interleave"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from radfm3d.modeling.llm import load_base_llm
    from radfm3d.modeling import RadFM3DForCausalLM

    report: dict[str, Any] = {
        "command": "python -m benchmarks.bench_model" + (" --quick" if args.quick else ""),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
    }
    if "vision" not in args.skip or "generation" not in args.skip:
        torch.manual_seed(0)
        model = RadFM3DForCausalLM.from_pretrained("demo").eval()
        if "vision" not in args.skip:
            report["vision_demo"] = bench_vision(model, batch=2 if args.quick else 4)
            print(json.dumps(report["vision_demo"]), flush=True)
        if "generation" not in args.skip:
            _, tokenizer = load_base_llm(model.config.text_model_name_or_path)
            report["generation_demo"] = bench_generation(model, tokenizer, new_tokens=8 if args.quick else 32)
            print(json.dumps(report["generation_demo"]), flush=True)
    if "interleave" not in args.skip:
        report["interleave_radfm_scale"] = bench_interleave(seq=512 if args.quick else 2048)
        print(json.dumps(report["interleave_radfm_scale"]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
