# Copyright (c) radfm3d contributors. Apache-2.0.
"""`make bench`: run every benchmark; each writes `benchmarks/results/<name>.json` and prints its table.

Benchmarks report ratios measured in the same process (never absolute pass/fail); they are not part of `make test`.
"""

from __future__ import annotations

import runpy
import sys

BENCHMARKS = ("benchmarks.bench_preprocessing", "benchmarks.bench_model", "benchmarks.bench_box_snapping",
              "benchmarks.bench_serve")

if __name__ == "__main__":
    for name in BENCHMARKS:
        print(f"\n##### {name}", flush=True)
        sys.argv = [name]
        runpy.run_module(name, run_name="__main__")
