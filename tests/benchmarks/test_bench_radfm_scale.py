# Copyright (c) radfm3d contributors. Apache-2.0.
"""benchmarks/bench_radfm_scale.py at small scale on the CPU: a ~125 MB random RadFM-layout checkpoint written
tensor by tensor, converted with ``radfm3d convert-radfm``, loaded in bf16, CPU int8 and disk offload; the JSON and
markdown table it writes. Timings are recorded, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # ~25 s of CPU on one core (one interpreter; all steps in process)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    folder = tmp_path_factory.mktemp("radfm_scale")
    out = folder / "radfm_scale.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_radfm_scale", "--scale", "small", "--in-process", "--threads", "1",
           "--device", "cpu", "--max-memory", "70MB", "--new-tokens", "4", "--write-chunk-mb", "4",
           "--work", str(folder / "work"), "--output", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text(), folder


def test_modes_run_and_agree(result) -> None:
    report, _, _ = result
    rows = {row["mode"]: row for row in report["modes"]}
    assert [row["mode"] for row in report["modes"]] == ["bf16", "int8", "offload"]
    for mode, row in rows.items():
        assert row["status"] == "ok", row
        assert row["load_s"] > 0 and row["peak_rss_bytes"] >= row["baseline_rss_bytes"] > 0
        for b in (1, 8):
            entry = row[f"batch_{b}"]
            assert entry["answers"] == b
            assert entry["ttft_s"] > 0 and entry["tokens_per_s"] > 0
            assert 0.0 <= entry["argmax_agreement"] <= 1.0
    assert rows["bf16"]["batch_1"]["argmax_agreement"] == 1.0 == rows["bf16"]["batch_8"]["argmax_agreement"]
    # disk offload streams the same bf16 weights: identical argmax; int8 drifts a little on random weights
    assert rows["offload"]["batch_8"]["argmax_agreement"] == 1.0
    assert "disk" in rows["offload"]["placement"]
    assert 0.5 < rows["int8"]["batch_8"]["argmax_agreement"] < 1.0
    # CPU int8 replaces the decoder Linears' fp32 weights (4 bytes) by int8 ones
    assert rows["int8"]["weights_bytes"] < 2 * rows["bf16"]["weights_bytes"]


def test_checkpoint_written_without_holding_the_model(result) -> None:
    report, _, folder = result
    write = report["write"]
    assert write["tensors"] > 250 and write["bytes"] > 100e6  # the whole RadFM key tree, unused modules included
    assert write["peak_rss_bytes"] <= write["peak_rss_bound_bytes"]
    assert write["peak_rss_bytes"] - write["baseline_rss_bytes"] < 0.6 * write["bytes"]
    assert report["convert"]["peak_rss_bytes"] <= report["convert"]["peak_rss_bound_bytes"]
    assert report["convert"]["parameters"] == report["parameters"]
    assert not (folder / "work" / "model").exists() and not (folder / "work" / "pytorch_model.bin").exists()


def test_markdown_table(result) -> None:
    report, table, _ = result
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| mode | status | load (s)") and set(lines[1]) <= {"|", "-"}
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["bf16", "int8", "offload"]
    assert all(len(line.split("|")) == len(lines[0].split("|")) for line in lines)
    assert report["command"] in table
