# Copyright (c) radfm3d contributors. Apache-2.0.
"""Helpers for the serving tests: the tiny model behind an :class:`Engine`, and a real ``radfm3d serve`` process on
a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CT = REPO / "bundles" / "radfm3d_demo" / "examples" / "ct_abdomen.nii.gz"
DICOM = REPO / "bundles" / "radfm3d_demo" / "examples" / "mr_chest_dicom"


def tiny_engine(seed: int = 0):
    """The tiny preset (random weights, seeded) and its processor in an Engine named ``"tiny"``."""
    import torch

    from radfm3d import RadFM3DForCausalLM, RadFM3DProcessor
    from radfm3d.modeling.configuration import RadFM3DConfig
    from radfm3d.serve.engine import Engine

    torch.manual_seed(seed)
    model = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).eval()
    return Engine(model, RadFM3DProcessor.from_model_config("tiny"), "tiny", "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: list[str], log: Path, timeout_s: float = 180.0) -> tuple[str, subprocess.Popen]:
    """``radfm3d serve tiny --port P *args`` in a subprocess; returns (base URL, process) once /health answers."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "radfm3d.cli", "serve", "tiny", "--port", str(port),
                             "--log-level", "warning", *args], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env, cwd=str(REPO))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ok":
                    return url, proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout_s} s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ThreadedServer:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
