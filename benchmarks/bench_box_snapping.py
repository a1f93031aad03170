# Copyright (c) radfm3d contributors. Apache-2.0.
"""What a grounding answer costs with box snapping: encoder passes and seconds (not part of the test run).

Run: ``.venv/bin/python -m benchmarks.bench_box_snapping [--repeat 3]`` -> ``benchmarks/results/box_snapping.json``.

The shipped demo model (real SmolLM2 base) answers "Locate the mass in the liver." on the shipped CT example as the
bundle's inference does: ``generate`` (greedy, 40 new tokens at most) and then the reading written into the inference
JSON (``read_findings``, its ``image_reading``); with box snapping on (as shipped) and off (the reader's setting
flipped in memory), best of ``repeat`` each, alternating. Encoder passes are counted with a forward hook on the
vision encoder. Reported: passes per answer, seconds per answer, the on/off ratio measured in this process.
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


def _snap_switch(model):
    """Setter of the model's snapping flag."""
    reader = getattr(model, "reader", None)
    if reader is None or not reader.snaps_boxes:
        raise SystemExit(f"{MODEL}: the shipped model does not snap boxes")

    def switch(on: bool) -> None:
        reader.settings["snap_boxes"] = bool(on)

    return switch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    from radfm3d.engine.training import load_processor, load_trained_model
    from radfm3d.io import load_image

    torch.manual_seed(0)
    model, processor = load_trained_model(MODEL), load_processor(MODEL)
    switch = _snap_switch(model)
    inputs = processor(text=["<image> Locate the mass in the liver."], images=[[load_image(SCAN)]])
    inputs.pop("grid_geometry", None)
    passes: list[int] = []
    hook = model.vision_model.register_forward_hook(lambda *_: passes.append(1))
    answers: dict[bool, str] = {}
    times: dict[bool, float] = {True: float("inf"), False: float("inf")}
    counts: dict[bool, int] = {}
    try:
        with torch.no_grad():
            for _ in range(args.repeat):
                for snap in (True, False):
                    switch(snap)
                    passes.clear()
                    start = time.perf_counter()
                    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
                    model.read_findings(inputs["pixel_values"], inputs.get("image_mask"))
                    times[snap] = min(times[snap], time.perf_counter() - start)
                    counts[snap] = len(passes)
                    answers[snap] = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0].strip()
                    if hasattr(model, "_encoded"):  # each answer starts without kept encoder outputs
                        model._encoded = None
    finally:
        hook.remove()
        switch(True)
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": str(MODEL.relative_to(ROOT)), "scan": str(SCAN.relative_to(ROOT)),
        "encoder_passes_per_answer": {"snapping": counts[True], "llm_box": counts[False]},
        "answer_s": {"snapping": round(times[True], 3), "llm_box": round(times[False], 3)},
        "ratio_snapping_over_llm_box": round(times[True] / times[False], 3),
        "answers": {"snapping": answers[True], "llm_box": answers[False]},
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
