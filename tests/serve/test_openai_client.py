# Copyright (c) radfm3d contributors. Apache-2.0.
"""A real ``radfm3d serve tiny`` process on a free loopback port, driven by the official ``openai`` package: upload,
ask, stream, boxes in ``radfm3d``; auth; bad requests answered with 4xx while the next good one works; 16
concurrent clients; memory bounded over 200 requests."""

from __future__ import annotations

import concurrent.futures
import shutil

import pytest

import openai  # noqa: E402 - the test extra
import psutil  # noqa: E402

from tests.serve.server_utils import CT, start_server, stop_server  # noqa: E402

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    shutil.copy(CT, allowed / "ct.nii.gz")
    log = tmp_path_factory.mktemp("log") / "server.log"
    url, proc = start_server(["--api-key", KEY, "--allow-dir", str(allowed), "--max-upload-mb", "3",
                              "--max-prompt-chars", "300"], log)
    yield url, proc
    stop_server(proc)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def file_id(oai):
    with CT.open("rb") as fh:
        info = oai.files.create(file=("ct_abdomen.nii.gz", fh), purpose="vision")
    assert info.object == "file" and info.bytes == CT.stat().st_size
    assert info.model_extra["geometry"]["spatial_shape"] == [144, 144, 50]
    return info.id


def content(file_id, text="Locate the liver."):
    return [{"type": "text", "text": text}, {"type": "input_volume", "input_volume": {"file_id": file_id}}]


def test_models_and_auth(server, oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_ask_and_stream_with_the_official_client(oai, file_id):
    resp = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content(file_id)}],
                                       max_tokens=8, seed=1)
    text = resp.choices[0].message.content
    assert isinstance(text, str) and resp.usage.completion_tokens <= 8
    extra = resp.model_extra["radfm3d"]
    assert extra["content"] == text and extra["images"][0]["file_id"] == file_id
    assert isinstance(extra["images"][0]["boxes"], list)
    stream = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content(file_id)}],
                                         max_tokens=8, seed=1, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason
    assert chunks[-1].model_extra["radfm3d"]["images"][0]["file_id"] == file_id
    same = oai.chat.completions.create(model="tiny", messages=[{
        "role": "user", "content": [{"type": "text", "text": "Locate the liver."},
                                    {"type": "input_volume", "input_volume": {"path": "ct.nii.gz"}}]}], max_tokens=8)
    assert same.choices[0].message.content == text  # the same scan by allowed path: the same greedy answer


@pytest.mark.parametrize("kind,error", [
    ("corrupt", openai.BadRequestError), ("traversal_zip", openai.BadRequestError),
    ("oversize", openai.APIStatusError), ("outside_path", openai.PermissionDeniedError),
    ("long_prompt", openai.BadRequestError), ("unknown_file", openai.NotFoundError),
])
def test_bad_requests_then_a_good_one(oai, file_id, tmp_path, kind, error):
    import io
    import zipfile

    with pytest.raises(error) as caught:
        if kind == "corrupt":
            oai.files.create(file=("ct.nii.gz", b"\x1f\x8bnot gzip"), purpose="vision")
        elif kind == "traversal_zip":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr("../../x.dcm", b"x")
            oai.files.create(file=("s.zip", buf.getvalue()), purpose="vision")
        elif kind == "oversize":
            oai.files.create(file=("big.nii", bytes(4 * 2**20)), purpose="vision")
        elif kind == "outside_path":
            oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                {"type": "input_volume", "input_volume": {"path": "../../../../etc/passwd"}}]}])
        elif kind == "long_prompt":
            oai.chat.completions.create(model="tiny",
                                        messages=[{"role": "user", "content": content(file_id, "x" * 301)}])
        else:
            oai.chat.completions.create(model="tiny",
                                        messages=[{"role": "user", "content": content("file-" + "1" * 24)}])
    assert 400 <= caught.value.status_code < 500
    assert "Traceback" not in str(caught.value.body)
    ok = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content(file_id)}],
                                     max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_file_routes_with_the_official_client(oai, file_id):
    with CT.open("rb") as fh:
        extra = oai.files.create(file=("second.nii.gz", fh), purpose="vision")
    assert oai.files.retrieve(extra.id).filename == "second.nii.gz"
    assert {f.id for f in oai.files.list()} >= {file_id, extra.id}
    assert oai.files.delete(extra.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(extra.id)


def test_sixteen_concurrent_clients_and_bounded_memory(server, oai, file_id):
    def one(k: int) -> str:
        r = oai.chat.completions.create(model="tiny", max_tokens=3, seed=k,
                                        messages=[{"role": "user", "content": content(file_id, f"Question {k}?")}])
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(one, range(16)))
    assert len(reasons) == 16 and all(r in ("stop", "length") for r in reasons)

    proc = psutil.Process(server[1].pid)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(40)))  # warm: allocator pools, caches
    before = proc.memory_info().rss
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(200)))
    grown = proc.memory_info().rss - before
    assert grown < 100 * 2**20, f"server RSS grew by {grown / 2**20:.1f} MiB over 200 requests"
