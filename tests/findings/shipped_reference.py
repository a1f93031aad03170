# Copyright (c) radfm3d contributors. Apache-2.0.
"""Reference answers of the shipped demo model on a fixed subset of the phantom benchmark's held-out test split.

``python -m tests.findings.shipped_reference --n 100 --out FILE`` generates the seed-0 phantoms (their split is fixed
by seed and case index, so the first cases of the 2,000-case benchmark are generated alone), takes the first ``n``
records of ``test.jsonl`` and writes, per record, the generated token ids and text (greedy, ``max_new_tokens`` 128,
one record per batch). ``--check FILE`` compares a fresh run with a stored file instead (exit 1 on any difference).
The test suite checks a few records (``tests/findings/test_shipped_model.py``); the 100-record check is run by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "bundles" / "radfm3d_demo" / "models" / "model"
#: cases generated to reach the records: test cases are about 1 in 10 (split by case index)
N_CASES = 150


def phantom_test_records(folder: str | Path, n_records: int, n_cases: int = N_CASES) -> list[dict[str, Any]]:
    """The first ``n_records`` records of the seed-0 test split (phantoms generated into ``folder`` if missing),
    with absolute image paths."""
    from radfm3d.data.phantoms import generate_phantoms

    folder = Path(folder)
    if not (folder / "test.jsonl").is_file():
        generate_phantoms(folder, n=n_cases, seed=0, dicom_fraction=0.0, progress=False)
    records = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines() if line.strip()]
    records = records[:n_records]
    for r in records:
        r["images"] = [str(folder / p) for p in r.get("images") or []]
    return records


def answers(model: Any, processor: Any, records: list[dict[str, Any]], max_new_tokens: int = 128
            ) -> dict[str, dict[str, Any]]:
    """``id -> {"task", "ids": generated token ids, "text"}`` (greedy, one record per batch)."""
    import torch

    out = {}
    for r in records:
        enc = processor(text=[r["prompt"]], images=[r["images"]], return_tensors="pt")
        enc.pop("grid_geometry", None)
        with torch.inference_mode():
            seq = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new = seq[0, enc["input_ids"].shape[1]:].tolist()
        out[str(r["id"])] = {"task": r.get("task"), "ids": new,
                             "text": processor.batch_decode([new], skip_special_tokens=True)[0].strip()}
    return out


def load_shipped() -> tuple[Any, Any]:
    from radfm3d.modeling import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    return RadFM3DForCausalLM.from_pretrained(MODEL_DIR), RadFM3DProcessor.from_pretrained(MODEL_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--data", default="/tmp/radfm3d_shipped_reference")
    parser.add_argument("--out")
    parser.add_argument("--check")
    args = parser.parse_args(argv)
    import time

    records = phantom_test_records(args.data, args.n)
    model, processor = load_shipped()
    t0 = time.perf_counter()
    got = answers(model, processor, records)
    seconds = time.perf_counter() - t0
    print(f"{len(got)} records in {seconds:.1f} s ({seconds / max(1, len(got)):.2f} s/record)")
    if args.out:
        Path(args.out).write_text(json.dumps(got, indent=1) + "\n")
    if args.check:
        ref = json.loads(Path(args.check).read_text())
        diff = [k for k in got if k in ref and ref[k]["ids"] != got[k]["ids"]]
        print(f"compared {sum(k in ref for k in got)} records: {len(diff)} differ {diff[:10]}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
