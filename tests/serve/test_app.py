# Copyright (c) radfm3d contributors. Apache-2.0.
"""The FastAPI app in process (TestClient) on the tiny model and the real demo CT: files, chat, streaming, auth,
limits, and every bad request answered with the right status while the server keeps working."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest


from fastapi.testclient import TestClient  # noqa: E402

from radfm3d.io import load_image  # noqa: E402
from radfm3d.serve.app import ServeSettings, create_app  # noqa: E402
from radfm3d.serve.files import FileLimits  # noqa: E402
from tests.serve.server_utils import CT, DICOM, tiny_engine  # noqa: E402

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def allow_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    shutil.copy(CT, root / "ct.nii.gz")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(CT, outside / "secret.nii.gz")
    (root / "escape.nii.gz").symlink_to(outside / "secret.nii.gz")  # a link out of the allowed folder
    return root


@pytest.fixture(scope="module")
def client(engine, allow_dir):
    limits = FileLimits(max_upload_bytes=4 * 2**20, max_zip_entries=64, max_unzipped_bytes=8 * 2**20,
                        max_files_per_owner=16)
    settings = ServeSettings(api_keys=["key-a", "key-b"], allow_dir=allow_dir, files=limits, max_prompt_chars=400,
                             max_tokens_limit=64, default_max_tokens=8, max_json_bytes=64 * 1024)
    with TestClient(create_app(engine, settings)) as c:
        yield c


@pytest.fixture(scope="module")
def ct_id(client) -> str:
    r = client.post("/v1/files", headers=A, files={"file": ("ct_abdomen.nii.gz", CT.read_bytes())},
                    data={"purpose": "vision"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def ask(client, content, headers=A, **kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **kw}
    return client.post("/v1/chat/completions", headers=headers, json=body)


def vol(file_id):
    return {"type": "input_volume", "input_volume": {"file_id": file_id}}


def assert_alive(client, ct_id):
    """After a bad request: health, and a good chat on the same file, still answer."""
    assert client.get("/health").json()["status"] == "ok"
    r = ask(client, [{"type": "text", "text": "Locate the liver."}, vol(ct_id)])
    assert r.status_code == 200, r.text


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in r.text
    return err


# ------------------------------------------------------------------------------------------------ auth
def test_health_needs_no_key_everything_else_does(client):
    assert client.get("/health").status_code == 200
    assert error_of(client.get("/v1/models"), 401)["type"] == "authentication_error"
    error_of(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error_of(client.get("/v1/models", headers={"Authorization": "Basic key-a"}), 401)
    error_of(client.post("/v1/files", files={"file": ("x.nii.gz", b"x")}), 401)
    model = client.get("/v1/models", headers=A).json()["data"][0]
    assert model["id"] == "tiny" and model["object"] == "model"
    assert model["radfm3d"]["recipe"]["spatial_size"] == [32, 32, 8]
    assert "base_llm" in model["radfm3d"] and "radfm3d_version" in model["radfm3d"]


# ------------------------------------------------------------------------------------------------ files
def test_upload_reports_the_scans_geometry(client, ct_id):
    info = client.get(f"/v1/files/{ct_id}", headers=A).json()
    ref = load_image(CT)
    assert info["object"] == "file" and info["bytes"] == CT.stat().st_size and info["filename"] == "ct_abdomen.nii.gz"
    g = info["geometry"]
    assert g["spatial_shape"] == list(ref.shape[1:])
    np.testing.assert_allclose(g["affine_ras"], np.asarray(ref.affine), atol=1e-5)
    assert g["modality"] == "CT" and "path" not in json.dumps(info).lower().replace("filename", "")


def test_file_list_is_a_cursor_page(client, ct_id):
    ids = [client.post("/v1/files", headers=A, files={"file": (f"p{k}.nii.gz", CT.read_bytes())}).json()["id"]
           for k in range(3)]
    page = client.get("/v1/files", headers=A, params={"limit": 2, "order": "asc", "after": ct_id}).json()
    mine = [f["id"] for f in client.get("/v1/files", headers=A, params={"order": "asc"}).json()["data"]]
    start = mine.index(ct_id) + 1
    assert [f["id"] for f in page["data"]] == mine[start:start + 2] and page["has_more"] is True
    last = client.get("/v1/files", headers=A, params={"after": mine[-2], "order": "asc"}).json()
    assert [f["id"] for f in last["data"]] == mine[-1:] and last["has_more"] is False
    assert client.get("/v1/files", headers=A).json()["data"][0]["id"] == ids[-1]  # newest first by default
    for file_id in ids:
        client.delete(f"/v1/files/{file_id}", headers=A)


def test_the_upload_name_is_only_a_name(client):
    r = client.post("/v1/files", headers=A, files={"file": ("../../../tmp/evil.nii.gz", CT.read_bytes())})
    assert r.status_code == 200 and r.json()["filename"] == "evil.nii.gz"
    stored = client.app.state.store.get(r.json()["id"], _owner("key-a"))
    assert stored.path.parent.parent == client.app.state.store.root  # inside the store, under a generated name
    client.delete(f"/v1/files/{r.json()['id']}", headers=A)


def test_dicom_zip_upload_reads_the_series(client):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(DICOM.iterdir()):
            zf.write(f, f"study/series/{f.name}")
    r = client.post("/v1/files", headers=A, files={"file": ("mr.zip", buf.getvalue())})
    assert r.status_code == 200, r.text
    ref = load_image(DICOM)
    assert r.json()["geometry"]["spatial_shape"] == list(ref.shape[1:])
    np.testing.assert_allclose(r.json()["geometry"]["affine_ras"], np.asarray(ref.affine), atol=1e-4)
    assert client.delete(f"/v1/files/{r.json()['id']}", headers=A).json()["deleted"] is True


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_single_file_nrrd_and_mha_uploads(client, tmp_path, suffix):
    import SimpleITK as sitk

    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(path), True)
    r = client.post("/v1/files", headers=A, files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 200, r.text
    ref = load_image(CT)
    np.testing.assert_allclose(r.json()["geometry"]["affine_ras"], np.asarray(ref.affine), atol=1e-4)
    assert client.delete(f"/v1/files/{r.json()['id']}", headers=A).status_code == 200


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("name,data,status,words", [
    ("ct.nii.gz", b"\x1f\x8b this is not a nifti", 400, "ct.nii.gz"),
    ("ct.nii", b"", 400, "empty"),
    ("notes.txt", b"hello", 400, "unsupported"),
    ("evil.zip", _zip({"../../etc/x.dcm": b"x"}), 400, "unsafe"),
    ("abs.zip", _zip({"/tmp/x.dcm": b"x"}), 400, "unsafe"),
    ("link.zip", _zip({"a.dcm": b"x"}, symlink="b.dcm"), 400, "symlink"),
    ("bomb.zip", _zip({"a.dcm": bytes(9 * 2**20)}), 400, "decompresses"),
    ("nodicom.zip", _zip({"readme.txt": b"no dicom here"}), 400, "nodicom.zip"),
    ("empty.zip", _zip({}), 400, "no files"),
    ("corrupt.zip", b"PK\x03\x04garbage", 400, "zip"),
    ("big.nii", bytes(5 * 2**20), 413, "limit"),
    ("detached.nrrd", b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                      b"data file: /etc/hostname\n\n", 400, "separate data file"),
    ("detached.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\n"
                     b"ElementDataFile = /etc/hostname\n", 400, "separate data file"),
])
def test_bad_uploads_are_refused_and_the_server_keeps_answering(client, ct_id, name, data, status, words):
    before = len(client.get("/v1/files", headers=A).json()["data"])
    err = error_of(client.post("/v1/files", headers=A, files={"file": (name, data)}), status)
    assert words.lower() in err["message"].lower()
    assert len(client.get("/v1/files", headers=A).json()["data"]) == before  # nothing half-stored
    assert_alive(client, ct_id)


def test_upload_without_a_file_part(client):
    error_of(client.post("/v1/files", headers=A, data={"purpose": "vision"}), 400)
    error_of(client.post("/v1/files", headers={**A, "content-type": "text/plain"}, content=b"x"), 400)


def test_files_are_private_to_their_key(client, ct_id):
    for call in (client.get, client.delete):
        assert error_of(call(f"/v1/files/{ct_id}", headers=B), 404)["code"] == "file_not_found"
    assert ct_id not in [f["id"] for f in client.get("/v1/files", headers=B).json()["data"]]
    assert error_of(ask(client, [vol(ct_id)], headers=B), 404)["code"] == "file_not_found"
    assert client.get(f"/v1/files/{ct_id}", headers=A).status_code == 200


def test_delete_and_expiry_forget_the_file_and_its_cache(client, engine):
    r = client.post("/v1/files", headers=A, files={"file": ("ct.nii.gz", CT.read_bytes())})
    fid = r.json()["id"]
    assert ask(client, [vol(fid)]).status_code == 200
    assert ("file", fid) in engine._cache
    assert client.delete(f"/v1/files/{fid}", headers=A).status_code == 200
    assert ("file", fid) not in engine._cache
    error_of(client.get(f"/v1/files/{fid}", headers=A), 404)
    error_of(ask(client, [vol(fid)]), 404)
    fid2 = client.post("/v1/files", headers=A, files={"file": ("ct.nii.gz", CT.read_bytes())}).json()["id"]
    store = client.app.state.store
    stored = store.get(fid2, _owner("key-a"))
    folder = stored.path.parent
    assert folder.is_dir() and store.get(fid2, _owner("key-b")) is None
    stored.expires_at = time.time() - 1  # its time is up
    error_of(client.get(f"/v1/files/{fid2}", headers=A), 404)
    assert not folder.exists()


def _owner(key):
    from radfm3d.serve.files import owner_of

    return owner_of(key)


# ------------------------------------------------------------------------------------------------ chat
def test_chat_answer_usage_and_radfm3d_field(client, ct_id):
    r = ask(client, [{"type": "text", "text": "Locate the liver."}, vol(ct_id)], max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert body["usage"]["completion_tokens"] <= 5 and body["usage"]["prompt_tokens"] > 8  # 8 image tokens
    extra = body["radfm3d"]
    assert extra["content"] == choice["message"]["content"]
    assert len(extra["images"]) == 1 and extra["images"][0]["file_id"] == ct_id
    assert extra["images"][0]["grid_geometry"]["spatial_size"] == [32, 32, 8]
    assert extra["recipe"]["spatial_size"] == [32, 32, 8] and extra["timings_s"]["generate"] >= 0


def test_follow_up_questions_reuse_the_preprocessed_volume(client, engine, ct_id):
    ask(client, [vol(ct_id)])
    hits, misses = engine.cache_hits, engine.cache_misses
    ask(client, [{"type": "text", "text": "Is this a CT?"}, vol(ct_id)])
    assert engine.cache_hits == hits + 1 and engine.cache_misses == misses


def test_concurrent_first_requests_preprocess_a_scan_once(engine):
    import concurrent.futures

    misses = engine.cache_misses
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: engine.prepare(("test", "stampede"), str(CT)), range(4)))
    assert engine.cache_misses == misses + 1 and all(r is results[0] for r in results)
    engine.forget(("test", "stampede"))


def test_read_budgets_are_checked_from_the_header(engine):
    for limits, words in ((FileLimits(max_read_bytes=2**20), "max_bytes"), (FileLimits(max_voxels=10_000), "voxel")):
        with TestClient(create_app(engine, ServeSettings(files=limits))) as c:
            err = error_of(c.post("/v1/files", files={"file": ("ct.nii.gz", CT.read_bytes())}), 400)
            assert err["message"].startswith("ct.nii.gz:") and words in err["message"], err


def test_bytes_stored_per_key_are_bounded(engine):
    limits = FileLimits(max_bytes_per_owner=int(CT.stat().st_size * 1.5))
    with TestClient(create_app(engine, ServeSettings(api_keys=["k"], files=limits))) as c:
        auth = {"Authorization": "Bearer k"}
        first = c.post("/v1/files", headers=auth, files={"file": ("a.nii.gz", CT.read_bytes())})
        assert first.status_code == 200
        err = error_of(c.post("/v1/files", headers=auth, files={"file": ("b.nii.gz", CT.read_bytes())}), 400)
        assert "limit" in err["message"] and len(c.get("/v1/files", headers=auth).json()["data"]) == 1
        c.delete(f"/v1/files/{first.json()['id']}", headers=auth)
        assert c.post("/v1/files", headers=auth, files={"file": ("b.nii.gz", CT.read_bytes())}).status_code == 200


def test_several_volumes_and_turns(client, ct_id, allow_dir):
    content = [{"type": "text", "text": "Compare"}, vol(ct_id), {"type": "text", "text": "with"},
               {"type": "input_volume", "input_volume": {"path": "ct.nii.gz"}}]
    r = ask(client, content)
    assert r.status_code == 200, r.text
    images = r.json()["radfm3d"]["images"]
    assert [i["index"] for i in images] == [0, 1] and images[1]["path"] == "ct.nii.gz"
    messages = [{"role": "system", "content": "You are a radiologist."},
                {"role": "user", "content": [{"type": "text", "text": "<image> What is this?"}, vol(ct_id)]},
                {"role": "assistant", "content": "A CT scan."},
                {"role": "user", "content": "Which region?"}]
    r = client.post("/v1/chat/completions", headers=A, json={"model": "tiny", "messages": messages, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > r.json()["usage"]["completion_tokens"] + 40  # history is in


def test_sampling_options(client, ct_id):
    content = [{"type": "text", "text": "Describe."}, vol(ct_id)]
    greedy = ask(client, content, max_tokens=12).json()
    assert greedy["choices"][0]["finish_reason"] == "length" and greedy["usage"]["completion_tokens"] == 12
    again = ask(client, content, max_tokens=12, temperature=0).json()
    assert again["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    s1 = ask(client, content, max_tokens=12, temperature=1.5, top_p=1.0, seed=7).json()["choices"][0]
    s2 = ask(client, content, max_tokens=12, temperature=1.5, top_p=1.0, seed=7).json()["choices"][0]
    assert s1["message"]["content"] == s2["message"]["content"]
    texts = {ask(client, content, max_tokens=12, temperature=1.5, seed=s).json()["choices"][0]["message"]["content"]
             for s in range(4)}
    assert len(texts) > 1  # the seed changes the sample
    text = s1["message"]["content"]
    if len(text) >= 3:  # stop on a piece of a known sampled answer: the answer ends before it
        stop = text[1:3]
        cut = ask(client, content, max_tokens=12, temperature=1.5, top_p=1.0, seed=7, stop=[stop]).json()
        assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"


def test_streaming_sends_openai_chunks_ending_with_done(client, ct_id):
    content = [{"type": "text", "text": "Locate the liver."}, vol(ct_id)]
    full = ask(client, content, max_tokens=10).json()
    with client.stream("POST", "/v1/chat/completions", headers=A,
                       json={"model": "tiny", "stream": True, "max_tokens": 10,
                             "stream_options": {"include_usage": True},
                             "messages": [{"role": "user", "content": content}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert last["radfm3d"]["images"][0]["file_id"] == ct_id and last["usage"]["completion_tokens"] <= 10


def test_boxes_in_the_answer_are_placed_in_voxels_and_ras_mm(engine):
    """A known box on the real CT through the server's box placement: the 0-99 box spanning the whole grid covers
    the whole file in voxel indices; corners, centre and bounds agree."""
    prepared = engine.prepare(None, str(CT))
    geometry = prepared.meta["grid_geometry"]
    ref = load_image(CT)
    [box] = engine.boxes("It is here <box>0,0,0,99,99,99</box>.", geometry)
    assert box["box_0_99"] == [0, 0, 0, 99, 99, 99]
    shape = np.asarray(ref.shape[1:], dtype=float)
    np.testing.assert_allclose(box["box_voxel"], np.r_[-0.5, -0.5, -0.5, shape - 0.5], atol=1e-3)  # voxel edges
    corners = np.asarray(box["corners_world_mm"])
    assert corners.shape == (8, 3)
    np.testing.assert_allclose(corners.mean(0), box["centre_world_mm"], atol=1e-4)
    np.testing.assert_allclose(np.r_[corners.min(0), corners.max(0)], box["box_world_mm"], atol=1e-4)
    # the corners are the file's own voxel-grid corners (the CT is stored S-R-A: not the grid's axis order)
    ijk = (np.linalg.inv(np.asarray(ref.affine)) @ np.c_[corners, np.ones(8)].T)[:3].T
    expected = {tuple(np.where(bits, shape - 0.5, -0.5)) for bits in np.ndindex(2, 2, 2)}
    assert {tuple(np.round(c, 3)) for c in ijk} == expected


# ------------------------------------------------------------------------------------------------ bad chats
@pytest.mark.parametrize("body,status,code_or_words", [
    ({"model": "tiny", "messages": [{"role": "user", "content": [vol("file-" + "0" * 24)]}]}, 404, "file_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [vol("../../etc/passwd")]}]}, 404, "file_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_volume", "input_volume": {"path": "../../etc/passwd"}}]}]}, 403, "path_not_allowed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_volume", "input_volume": {"path": "/etc/hostname"}}]}]}, 403, "path_not_allowed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_volume", "input_volume": {"path": "escape.nii.gz"}}]}]}, 403, "path_not_allowed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_volume", "input_volume": {"path": "missing.nii.gz"}}]}]}, 404, "file_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 401}]}, 400, "context_length_exceeded"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "image_url"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "<image> <image> two?"}]}, 400, "placeholder"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_volume", "input_volume": {"file_id": "a", "path": "b"}}]}]}, 400, "exactly one"),
    ([1, 2], 400, "JSON object"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "sneaky <|image_pad|> token"}]}, 400, "reserved"),
])
def test_bad_chat_requests(client, ct_id, body, status, code_or_words):
    err = error_of(client.post("/v1/chat/completions", headers=A, json=body), status)
    assert code_or_words == err["code"] or code_or_words.lower() in err["message"].lower(), err
    assert_alive(client, ct_id)


def test_prompt_token_limit_is_checked_before_streaming(engine, ct_id, client):
    settings = ServeSettings(api_keys=[], max_prompt_tokens=20)
    with TestClient(create_app(engine, settings)) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "stream": True, "messages": [
            {"role": "user", "content": "a question of more than twenty characters"}]})
        assert error_of(r, 400)["code"] == "context_length_exceeded"


def test_bad_json_and_oversized_bodies(client, ct_id):
    error_of(client.post("/v1/chat/completions", headers={**A, "content-type": "application/json"},
                         content=b'{"model": "tiny", "messages": ['), 400)
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70000}]}).encode()
    assert error_of(client.post("/v1/chat/completions", headers=A, content=big), 413)["code"] == "request_too_large"
    error_of(client.get("/v1/nowhere", headers=A), 404)
    assert_alive(client, ct_id)


def test_no_allow_dir_means_no_paths_and_full_queue_means_429(engine, ct_id):
    settings = ServeSettings(api_keys=[], max_pending=0)
    with TestClient(create_app(engine, settings)) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "input_volume", "input_volume": {"path": str(CT)}}]}]})
        assert error_of(r, 403)["code"] == "path_not_allowed"
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert error_of(r, 429)["type"] == "rate_limit_error"
        assert c.get("/v1/models").status_code == 200  # no key configured: loopback-only server, open


def test_a_request_over_the_time_limit_is_stopped_with_504(engine, ct_id, client):
    settings = ServeSettings(api_keys=[], request_timeout_s=0.001, max_tokens_limit=512)
    with TestClient(create_app(engine, settings)) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 400, "messages": [
            {"role": "user", "content": "Describe everything."}]})
        assert error_of(r, 504)["code"] == "timeout"
        assert c.get("/health").status_code == 200
    assert_alive(client, ct_id)  # the model lock was released


def test_an_internal_failure_is_a_json_500_without_details(client, engine, ct_id, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail from deep inside")

    monkeypatch.setattr(engine, "generate", broken)
    raw = TestClient(client.app, raise_server_exceptions=False)  # as a real server: answer, log, go on
    r = ask(raw, [vol(ct_id)])
    err = error_of(r, 500)
    assert err["type"] == "server_error" and "secret" not in r.text
    with raw.stream("POST", "/v1/chat/completions", headers=A, json={
            "model": "tiny", "stream": True, "messages": [{"role": "user", "content": [vol(ct_id)]}]}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and '"server_error"' in lines[-2] and "secret" not in "".join(lines)
    monkeypatch.undo()
    assert_alive(client, ct_id)


def test_refuses_a_public_bind_without_a_key():
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.serve.app import build_parser, is_loopback, settings_from_args

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(RadFM3DInputError, match="api-key"):
        settings_from_args(build_parser().parse_args(["tiny", "--host", "0.0.0.0"]))
    args = build_parser().parse_args(["tiny", "--host", "0.0.0.0", "--api-key", "k"])
    assert settings_from_args(args).api_keys == ["k"]
