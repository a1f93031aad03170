# Copyright (c) radfm3d contributors. Apache-2.0.
"""`make bench`: run every benchmark; each writes `benchmarks/results/<name>.json` and prints its table.

Benchmarks report ratios measured in the same process (never absolute pass/fail); they are not part of `make test`.
"""

from __future__ import annotations

import runpy
import sys

BENCHMARKS: tuple[tuple[str, list[str]], ...] = (
    ("benchmarks.bench_preprocessing", []), ("benchmarks.bench_model", []), ("benchmarks.bench_box_snapping", []),
    ("benchmarks.bench_serve", []),
    # RadFM-layout checkpoint at small scale (~125 MB, ~1 min); the 13B run needs a GPU: benchmarks/device/run_scale.sh
    ("benchmarks.bench_radfm_scale", ["--scale", "small", "--device", "cpu", "--max-memory", "70MB"]),
)

if __name__ == "__main__":
    for name, args in BENCHMARKS:
        print(f"\n##### {name} {' '.join(args)}", flush=True)
        sys.argv = [name, *args]
        try:
            runpy.run_module(name, run_name="__main__")
        except SystemExit as done:  # a benchmark's main() returning its exit code
            if done.code not in (0, None):
                raise
