# Copyright (c) radfm3d contributors. Apache-2.0.
"""Server overhead benchmark: ``python -m benchmarks.bench_serve [MODEL] [--requests 20] [--max-tokens 16]``.

Measures, on one scan and one prompt with greedy decoding:

- ``direct``: the same answer from the Python API in this process (:class:`Engine` ``generate`` on the cached
  preprocessed volume, i.e. the model work alone), per request, on the main thread and on a worker thread (as the
  server runs it);
- ``server``: a real ``radfm3d serve MODEL`` process on a free loopback port, driven by
  :class:`radfm3d.client.RadFM3DClient` at concurrency 1, 4 and 16: requests/s, p50 / p95 latency;
- time to first token with ``stream: true`` (p50);
- the overhead ratio ``server p50 at concurrency 1 / direct p50 (worker thread)``.

Prints one JSON object, written to ``benchmarks/results/serve.json`` (or ``--out``). Timings are measured, never
asserted. MODEL defaults to the ``tiny`` preset (seeded), so ``make bench`` stays short.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cli"]

_CT = Path(__file__).resolve().parents[1] / "bundles" / "radfm3d_demo" / "examples" / "ct_abdomen.nii.gz"
_RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50_s": round(float(np.percentile(arr, 50)), 4), "p95_s": round(float(np.percentile(arr, 95)), 4)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(model: str, port: int, device: str | None) -> subprocess.Popen:
    args = [sys.executable, "-m", "radfm3d.cli", "serve", model, "--port", str(port), "--log-level", "warning"]
    if device:
        args += ["--device", device]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"radfm3d serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("radfm3d serve did not start")


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="tiny", help="model folder or preset (default: tiny)")
    parser.add_argument("--scan", default=str(_CT))
    parser.add_argument("--prompt", default="Locate the liver.")
    parser.add_argument("--requests", type=int, default=20, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=str(_RESULTS), help="where to write the JSON (default: benchmarks/results/serve.json)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    from radfm3d.client import RadFM3DClient
    from radfm3d.serve.engine import Engine, GenerationParams

    params = GenerationParams(max_tokens=args.max_tokens)
    model = args.model
    tmp = None
    if not (Path(model) / "config.json").is_file():  # a preset: save one seeded copy so both sides run the same weights
        import tempfile

        import torch

        from radfm3d import RadFM3DForCausalLM, RadFM3DProcessor

        torch.manual_seed(0)
        tmp = tempfile.TemporaryDirectory(prefix="radfm3d-bench-")
        RadFM3DForCausalLM.from_pretrained(model).save_pretrained(tmp.name)
        RadFM3DProcessor.from_model_config(model).save_pretrained(tmp.name)
        model = tmp.name
    engine = Engine.load(model, device=args.device)
    image = engine.prepare("bench", args.scan)
    prompt = f"<image> {args.prompt}"
    engine.generate(prompt, [image], params)  # warm-up

    def timed() -> tuple[list[float], Any]:
        times, out = [], None
        for _ in range(args.requests):
            t0 = time.perf_counter()
            out = engine.generate(prompt, [image], params)
            times.append(time.perf_counter() - t0)
        return times, out

    direct_main, reference = timed()
    # the server generates in a worker thread (where torch runs its ops single-threaded): the same here, so the
    # ratio below is the HTTP/serving overhead and not a threading difference
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        direct, _ = pool.submit(timed).result()
    engine = image = None  # free the model before the server process loads its own

    port = _free_port()
    proc = _start(model, port, args.device)
    try:
        client = RadFM3DClient(f"http://127.0.0.1:{port}", timeout=600)
        file_id = client.upload(args.scan)["id"]
        first = client.ask(file_id, args.prompt, max_tokens=args.max_tokens)  # warm-up (and the cache)
        levels: dict[str, Any] = {}
        for concurrency in (1, 4, 16):
            def one(_: int) -> float:
                t0 = time.perf_counter()
                client.ask(file_id, args.prompt, max_tokens=args.max_tokens)
                return time.perf_counter() - t0

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                latencies = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t0
            levels[str(concurrency)] = {"requests_per_s": round(args.requests / wall, 3), **_percentiles(latencies)}
        ttft = []
        for _ in range(max(3, args.requests // 2)):
            marks: list[float] = []
            t0 = time.perf_counter()
            client.ask(file_id, args.prompt, max_tokens=args.max_tokens,
                       on_delta=lambda _piece: marks.append(time.perf_counter()) if not marks else None)
            if marks:
                ttft.append(marks[0] - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if tmp is not None:
            tmp.cleanup()
    result = {
        "model": args.model, "scan": os.path.basename(args.scan), "max_tokens": args.max_tokens,
        "requests_per_level": args.requests, "same_answer_as_python_api": first.text == reference.text,
        "completion_tokens": {"direct": reference.completion_tokens, "server": first.usage.get("completion_tokens")},
        "direct_python_api_main_thread": _percentiles(direct_main),
        "direct_python_api_worker_thread": _percentiles(direct), "server": levels,
        "time_to_first_token": _percentiles(ttft) if ttft else None,
        "overhead_ratio_c1_p50": round(levels["1"]["p50_s"] / _percentiles(direct)["p50_s"], 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from radfm3d.utils import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
