# Copyright (c) radfm3d contributors. Apache-2.0.
"""Batched generation throughput of the ``demo`` preset on a GPU against batch 1, beside the bare LLM's own ratio.

Run: ``python -m benchmarks.device.gpu_generation [--device cuda] [--dtype bfloat16] --output FILE.json``

The measurement is ``benchmarks.bench_model.bench_generation``, unchanged (the CPU figures in
``benchmarks/results/model.json`` come from it): 1 and 8 image+question prompts, ``generate`` of the full model
against the bare LLM's ``generate`` on text prompts of the same length, greedy, ``min_new_tokens ==
max_new_tokens``, best of ``--repeat``. It runs with ``--device`` as torch's default device, so the prompts and
scans it builds are made there. The LLM's weights are random (``load_text_weights=False``): the base LLM's GGUF does
not travel to a device machine, and greedy decoding of a fixed number of tokens costs the same with any weights.
The tokenizer is the shipped demo model's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO_TOKENIZER = ROOT / "bundles" / "radfm3d_demo" / "models" / "model"


def run(device: str, dtype: str, new_tokens: int, repeat: int, tokenizer_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from benchmarks.bench_model import bench_generation
    from radfm3d.modeling import RadFM3DForCausalLM

    torch.manual_seed(0)
    model = RadFM3DForCausalLM.from_pretrained("demo", load_text_weights=False)
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.device(device):  # bench_generation's prompts and scans are created on the device
        result = bench_generation(model, tokenizer, new_tokens=new_tokens, repeat=repeat)
    result["bare_batched_throughput_over_batch1"] = round(
        result["batch_8"]["bare_tokens_per_s"] / result["batch_1"]["bare_tokens_per_s"], 2)
    result.update(device=device, dtype=dtype, llm_weights="random (load_text_weights=False)",
                  gpu=torch.cuda.get_device_name(0) if device == "cuda" else None,
                  torch=torch.__version__, platform=platform.platform())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, default=DEMO_TOKENIZER, help="tokenizer folder (the demo model's)")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    from radfm3d.utils import atomic_write_text

    result = run(args.device, args.dtype, args.new_tokens, args.repeat, args.tokenizer)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "dtype", "batched_throughput_over_batch1",
                                             "bare_batched_throughput_over_batch1")}))
    b1, b8 = result["batch_1"], result["batch_8"]
    print(f"batch 1: ours {b1['ours_tokens_per_s']} tokens/s, bare {b1['bare_tokens_per_s']}; "
          f"batch 8: ours {b8['ours_tokens_per_s']}, bare {b8['bare_tokens_per_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
