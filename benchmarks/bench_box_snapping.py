# Copyright (c) radfm3d contributors. Apache-2.0.
"""What box snapping costs a grounding answer (not part of the test run).

Run: ``.venv/bin/python -m benchmarks.bench_box_snapping [--repeat 3]`` -> ``benchmarks/results/box_snapping.json``.

The shipped demo model (real SmolLM2 base) answers "Locate the mass in the liver." on the shipped CT example with
``generate`` (greedy, 40 new tokens at most), with box snapping on (as shipped) and off (the same model, the spec key
flipped in memory), best of ``repeat`` each, alternating; plus the bare cost of the extra encoder passes snapping
runs (the scan and its ``test_time_shifts`` copies). Reported as times and the on/off ratio measured in this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "box_snapping.json"
MODEL = ROOT / "bundles" / "radfm3d_demo" / "models" / "model"
SCAN = ROOT / "bundles" / "radfm3d_demo" / "examples" / "ct_abdomen.nii.gz"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    from radfm3d.engine.training import load_processor, load_trained_model
    from radfm3d.io import load_image

    torch.manual_seed(0)
    model, processor = load_trained_model(MODEL), load_processor(MODEL)
    prompter = model.findings_prompter
    if prompter is None or not prompter.snaps_boxes:
        raise SystemExit(f"{MODEL}: the shipped model does not snap boxes")
    inputs = processor(text=["<image> Locate the mass in the liver."], images=[[load_image(SCAN)]])
    inputs.pop("grid_geometry", None)
    answers: dict[bool, str] = {}
    times: dict[bool, float] = {True: float("inf"), False: float("inf")}
    with torch.no_grad():
        for _ in range(args.repeat):
            for snap in (True, False):
                prompter.spec["snap_boxes"] = snap
                start = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
                times[snap] = min(times[snap], time.perf_counter() - start)
                answers[snap] = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0].strip()
        prompter.spec["snap_boxes"] = True
        images = inputs["pixel_values"][:, 0]
        encoder = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            prompter.site_boxes(model.get_visual_latents(images), images.shape[-3:], model._shifted_latents(images))
            encoder = min(encoder, time.perf_counter() - start)
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": str(MODEL.relative_to(ROOT)), "scan": str(SCAN.relative_to(ROOT)),
        "generate_s": {"snapping": round(times[True], 3), "llm_box": round(times[False], 3)},
        "ratio_snapping_over_llm_box": round(times[True] / times[False], 3),
        "snapping_encoder_passes_s": round(encoder, 3),
        "encoder_passes": 1 + len(prompter.test_time_shifts),
        "answers": {"snapping": answers[True], "llm_box": answers[False]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
