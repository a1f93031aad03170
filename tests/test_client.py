# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d.client``: imports without torch; against a real uvicorn server on loopback (tiny model, the demo CT
and DICOM series): upload, ask, stream, cancel, errors."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest


from radfm3d.client import Answer, RadFM3DClient, RadFM3DClientError  # noqa: E402
from tests.serve.server_utils import CT, DICOM, ThreadedServer, free_port, tiny_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_client_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "import radfm3d.client as c; print(c.RadFM3DClient.__name__)\n"
            "assert 'transformers' not in sys.modules and 'monai' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "RadFM3DClient"


@pytest.fixture(scope="module")
def server():
    from radfm3d.serve.app import ServeSettings, create_app

    app = create_app(tiny_engine(), ServeSettings(api_keys=["client-key"], max_tokens_limit=1000))
    with ThreadedServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> RadFM3DClient:
    return RadFM3DClient(server.url + "/v1", api_key="client-key", timeout=60)


def test_loopback_ignores_proxy_settings(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy that does not exist
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert RadFM3DClient(server.url, api_key="client-key").health()["status"] == "ok"


def test_upload_ask_and_stream(client):
    assert client.health()["status"] == "ok" and "tiny" in client.test_connection()
    info = client.upload(CT)
    assert info["filename"] == "ct_abdomen.nii.gz" and info["geometry"]["spatial_shape"] == [144, 144, 50]
    assert [f["id"] for f in client.list_files()] == [info["id"]]
    answer = client.ask([info["id"]], "Locate the liver.", max_tokens=10)
    assert isinstance(answer, Answer) and answer.usage["completion_tokens"] <= 10
    assert answer.images[0]["file_id"] == info["id"] and answer.boxes == answer.images[0]["boxes"]
    assert answer.images[0]["grid_geometry"]["spatial_size"] == [32, 32, 8]
    pieces: list[str] = []
    streamed = client.ask(info["id"], "Locate the liver.", max_tokens=10, on_delta=pieces.append)
    assert "".join(pieces) == streamed.text == answer.text
    assert streamed.finish_reason == answer.finish_reason and streamed.usage == answer.usage
    assert client.delete(info["id"])
    with pytest.raises(RadFM3DClientError) as err:
        client.get_file(info["id"])
    assert err.value.status == 404 and err.value.code == "file_not_found"


def test_dicom_folder_upload(client):
    info = client.upload(DICOM)
    assert info["filename"] == "mr_chest_dicom.zip" and info["geometry"]["modality"] == "MR"
    client.delete(info["id"])


def test_cancel_stops_reading_and_keeps_the_prefix(client):
    info = client.upload(CT)
    full = client.ask(info["id"], "Describe.", max_tokens=40).text
    cancel = threading.Event()
    seen: list[str] = []

    def on_delta(piece: str) -> None:
        seen.append(piece)
        cancel.set()

    partial = client.ask(info["id"], "Describe.", max_tokens=40, on_delta=on_delta, cancel=cancel)
    assert partial.finish_reason == "cancelled" and full.startswith(partial.text) and len(seen) == 1
    assert client.ask(info["id"], "Describe.", max_tokens=40).text == full  # the server is fine afterwards


def test_a_request_past_the_context_is_a_400_in_both_modes(client):
    """prompt + max_tokens beyond the LLM's context (tiny: 512): a client error with the numbers, streamed or not."""
    from radfm3d.client import RadFM3DClientError

    info = client.upload(CT)
    for on_delta in (None, lambda _: None):
        with pytest.raises(RadFM3DClientError) as err:
            client.ask(info["id"], "Describe.", max_tokens=1000, on_delta=on_delta)
        assert err.value.status == 400 and "context of 512 tokens" in str(err.value)
    assert client.ask(info["id"], "Describe.", max_tokens=4).text is not None  # still serving


def test_closing_a_stream_stops_generation_on_the_server(server, client):
    import time

    engine = server.server.config.app.state.engine
    info = client.upload(CT)
    cancelled = engine.stats["cancelled"]
    cancel = threading.Event()
    answer = client.ask(info["id"], "Describe.", max_tokens=480, on_delta=lambda _: cancel.set(), cancel=cancel)
    assert answer.finish_reason == "cancelled"
    deadline = time.time() + 60
    while engine.stats["cancelled"] == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats["cancelled"] == cancelled + 1  # the generation was stopped, not run to 480 tokens


def test_errors_are_clear(server):
    with pytest.raises(RadFM3DClientError) as err:
        RadFM3DClient(server.url, api_key="wrong").models()
    assert err.value.status == 401 and "API key" in err.value.message
    with pytest.raises(RadFM3DClientError) as err:
        RadFM3DClient(f"http://127.0.0.1:{free_port()}", timeout=5).health()
    assert err.value.status == 0 and "cannot reach" in str(err.value)
    with pytest.raises(RadFM3DClientError) as err:
        RadFM3DClient(server.url, api_key="client-key").upload_bytes(b"junk", "scan.nii.gz")
    assert err.value.status == 400 and "scan.nii.gz" in err.value.message
