# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d serve``: an OpenAI-compatible HTTP server that takes whole 3D scans with their geometry.

Routes: ``GET /health`` (no key), ``GET /v1/models``, ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``,
``POST /v1/chat/completions`` (user content parts ``{"type": "text"}`` and ``{"type": "input_volume",
"input_volume": {"file_id": ...} | {"path": ...}}``; ``stream: true`` sends OpenAI chunks ending ``data: [DONE]``;
the extra top-level ``radfm3d`` field carries per-image boxes in voxel indices and RAS mm, the recipe, timings).

Safety: loopback by default and no non-loopback bind without an API key; bearer keys compared in constant time;
files private to the key that uploaded them and expiring; request body, upload, voxel, zip, prompt and token limits;
one generation at a time on the model with a bounded queue (429 beyond it) and a per-request timeout (504); every
error a JSON body in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _err:  # pragma: no cover - the install hint is the point
    raise ImportError("radfm3d serve needs fastapi, uvicorn and python-multipart: "
                      "pip install fastapi uvicorn python-multipart") from _err

from radfm3d.errors import RadFM3DInputError
from radfm3d.serve.files import FileLimits, FileStore, owner_of, scan_kind

__all__ = ["ServeSettings", "APIError", "create_app", "cli", "is_loopback"]

logger = logging.getLogger("radfm3d.serve")
_ROLES = {"system", "developer", "user", "assistant"}
_IMAGE = "<image>"


@dataclass
class ServeSettings:
    """Server limits. Sizes in bytes, times in seconds."""

    api_keys: list[str] = field(default_factory=list)
    allow_dir: Path | None = None
    files: FileLimits = field(default_factory=FileLimits)
    max_json_bytes: int = 1 << 20
    max_prompt_chars: int = 8000
    max_prompt_tokens: int = 8192
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_images: int = 8
    max_pending: int = 32
    request_timeout_s: float = 600.0


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------- body limit
class _BodyTooLarge(APIError):
    """Raised from ``receive`` when the streamed body passes the limit; answered as a 413 wherever it surfaces."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes", code="request_too_large")


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 when a request body (declared or streamed) exceeds its route's limit."""

    def __init__(self, app: Any, upload_limit: int, default_limit: int) -> None:
        self.app, self.upload_limit, self.default_limit = app, upload_limit, default_limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope.get("path", "").rstrip("/") == "/v1/files" else self.default_limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, APIError(413, f"request body of {int(declared)} bytes is over the limit of "
                                                  f"{limit} bytes", code="request_too_large"))
            return
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge as err:
            if not started:
                await _send_error(send, err)


async def _send_error(send: Any, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------- requests
@dataclass
class _VolumeRef:
    key: Any
    loader: Any
    source: dict[str, Any]
    geometry: dict[str, Any] | None


def _content_parts(content: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content must be a string or a list of parts",
                       param=f"messages[{index}].content")
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_volume"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"messages[{index}].content[{k}] has type {kind!r}; parts are 'text' and "
                                "'input_volume'", param=f"messages[{index}].content[{k}]")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content[{k}].text must be a string",
                           param=f"messages[{index}].content[{k}]")
    return content


def _number(body: dict, name: str, kind: type, lo: float, hi: float, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    not_number = isinstance(value, bool) or not isinstance(value, (int, float))
    if not_number or (kind is int and not float(value).is_integer()):
        raise APIError(400, f"{name} must be a{'n integer' if kind is int else ' number'}", param=name)
    if not lo <= value <= hi:
        raise APIError(400, f"{name} must be between {lo} and {hi}, got {value}", param=name)
    return kind(value)


# ------------------------------------------------------------------------------------------- app
def create_app(engine: Any, settings: ServeSettings | None = None, store: FileStore | None = None) -> Any:
    """The FastAPI application around a loaded :class:`radfm3d.serve.engine.Engine`."""
    from radfm3d.serve.engine import Cancelled, GenerationParams

    settings = settings or ServeSettings()
    store = store or FileStore(settings.files)
    store.on_remove.append(lambda file_id: engine.forget(("file", file_id)))
    keys = [k for k in settings.api_keys if k]
    allow_dir = settings.allow_dir.resolve() if settings.allow_dir is not None else None
    state = {"pending": 0}
    validating = asyncio.Semaphore(2)  # uploads read and checked at once (CPU and memory beside generation)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        store.close()  # uploaded files live only as long as the server

    app = FastAPI(title="radfm3d", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.store, app.state.settings = engine, store, settings

    # ---------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RadFM3DInputError)
    async def _input_error(request: Request, err: RadFM3DInputError) -> JSONResponse:
        return JSONResponse(APIError(400, str(err), code="invalid_input").body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        return JSONResponse(APIError(400, f"invalid request: {first.get('msg', 'bad input')} at "
                                          f"{'.'.join(str(p) for p in first.get('loc', ()))}").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, "internal server error (details are in the server log)",
                                     type="server_error").body(), status_code=500)

    # ---------------------------------------------------------------- auth
    def owner(request: Request) -> str:
        if not keys:
            return owner_of(None)
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                           code="invalid_api_key")
        matched = None
        for key in keys:  # every key compared, in constant time each
            if secrets.compare_digest(given.encode(), key.encode()):
                matched = key
        if matched is None:
            raise APIError(401, "incorrect API key", type="authentication_error", code="invalid_api_key")
        return owner_of(matched)

    # ---------------------------------------------------------------- routes
    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id}

    def model_object() -> dict[str, Any]:
        info = engine.describe()
        return {"id": engine.model_id, "object": "model", "created": int(app.state.started), "owned_by": "radfm3d",
                "radfm3d": info}

    app.state.started = time.time()

    @app.get("/v1/models")
    def list_models(request: Request) -> dict[str, Any]:
        owner(request)
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str, request: Request) -> dict[str, Any]:
        owner(request)
        if model_id != engine.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist; this server has {engine.model_id!r}",
                           type="not_found_error", code="model_not_found", param="model")
        return model_object()

    @app.post("/v1/files")
    async def upload(request: Request) -> dict[str, Any]:
        who = owner(request)
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
        except _BodyTooLarge:
            raise
        except Exception as err:  # malformed multipart
            raise APIError(400, f"send multipart/form-data with a 'file' part ({type(err).__name__})",
                           param="file") from None
        try:
            part = form.get("file")
            if part is None or isinstance(part, str) or not hasattr(part, "read"):
                raise APIError(400, "multipart field 'file' (the scan) is missing", param="file")
            filename = os.path.basename(str(part.filename or "").replace("\\", "/"))[-200:] or "upload"
            scan_kind(filename)  # name check before any bytes are copied
            file_id, folder = store.new_slot(who)
            target = folder / "upload.part"
            limit = settings.files.max_upload_bytes
            size = 0
            with open(target, "wb") as out:
                while chunk := await part.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        out.close()
                        shutil.rmtree(folder, ignore_errors=True)
                        raise APIError(413, f"{filename}: over the upload limit of {limit} bytes",
                                       code="file_too_large", param="file")
                    out.write(chunk)
        finally:
            await form.close()
        async with validating:
            stored = await run_in_threadpool(store.add, file_id, folder, who, filename, target)
        return stored.to_json()

    @app.get("/v1/files")
    def list_files(request: Request, after: str | None = None, limit: int = 10000, order: str = "desc") -> dict:
        """The caller's files, OpenAI's cursor page (``after`` an id, ``limit``, ``order`` by creation time)."""
        who = owner(request)
        if not 1 <= limit <= 10000 or order not in ("asc", "desc"):
            raise APIError(400, "limit must be 1..10000 and order 'asc' or 'desc'", param="limit")
        files = store.list(who)[:: -1 if order == "desc" else 1]
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1:] if after in ids else []
        page = files[:limit]
        return {"object": "list", "data": [f.to_json() for f in page], "has_more": len(files) > len(page),
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    def _file_or_404(file_id: str, who: str) -> Any:
        stored = store.get(file_id, who)
        if stored is None:
            raise APIError(404, f"no such file: {file_id!r} (unknown, expired, or uploaded with another key)",
                           type="not_found_error", code="file_not_found", param="file_id")
        return stored

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, request: Request) -> dict[str, Any]:
        return _file_or_404(file_id, owner(request)).to_json()

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, request: Request) -> dict[str, Any]:
        who = owner(request)
        _file_or_404(file_id, who)
        store.delete(file_id, who)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---------------------------------------------------------------- chat
    def _volume(spec: Any, who: str, where: str) -> _VolumeRef:
        from radfm3d.io import load_image

        if not isinstance(spec, dict) or ("file_id" in spec) == ("path" in spec):
            raise APIError(400, f"{where}.input_volume needs exactly one of 'file_id' or 'path'", param=where)
        budgets = settings.files.read_kwargs()
        if "file_id" in spec:
            stored = _file_or_404(str(spec["file_id"]), who)

            def load_stored() -> Any:
                try:
                    return load_image(stored.path, **budgets)
                except RadFM3DInputError as err:  # name the upload, not the server's folder
                    raise RadFM3DInputError(stored.filename, err.problem) from None

            return _VolumeRef(("file", stored.id), load_stored, {"file_id": stored.id, "filename": stored.filename},
                              stored.geometry)
        raw = spec["path"]
        if allow_dir is None:
            raise APIError(403, "this server reads no paths on its disk (start it with --allow-dir); upload the "
                                "scan to /v1/files and send its file_id", type="permission_error",
                           code="path_not_allowed", param=where)
        if not isinstance(raw, str) or not raw or "\x00" in raw:
            raise APIError(400, f"{where}.input_volume.path must be a non-empty string", param=where)
        resolved = (allow_dir / raw).resolve()
        if resolved != allow_dir and allow_dir not in resolved.parents:
            raise APIError(403, f"path {raw!r} is outside the allowed folder", type="permission_error",
                           code="path_not_allowed", param=where)
        if not resolved.exists():
            raise APIError(404, f"path {raw!r} does not exist under the allowed folder", type="not_found_error",
                           code="file_not_found", param=where)
        st = resolved.stat()
        shown = str(resolved.relative_to(allow_dir))

        def load() -> Any:
            try:
                return load_image(resolved, **budgets)
            except RadFM3DInputError as err:
                raise RadFM3DInputError(shown, err.problem) from None

        return _VolumeRef(("path", str(resolved), st.st_mtime_ns, st.st_size), load, {"path": shown}, None)

    def parse_chat(body: Any, who: str) -> tuple[list[tuple[str, str]], str | None, list[_VolumeRef]]:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, engine.model_id):
            raise APIError(404, f"the model {model!r} does not exist; this server has {engine.model_id!r}",
                           type="not_found_error", code="model_not_found", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        turns: list[tuple[str, str]] = []
        system: list[str] = []
        volumes: list[_VolumeRef] = []
        chars = 0
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
                raise APIError(400, f"messages[{i}] needs a role of {sorted(_ROLES)}", param=f"messages[{i}]")
            role = msg["role"]
            parts = _content_parts(msg.get("content"), i)
            texts = [p["text"] for p in parts if p["type"] == "text"]
            vols = [p for p in parts if p["type"] == "input_volume"]
            chars += sum(len(t) for t in texts)
            if chars > settings.max_prompt_chars:
                raise APIError(400, f"the messages hold over {settings.max_prompt_chars} characters of text",
                               code="context_length_exceeded", param="messages")
            written = sum(t.count(_IMAGE) for t in texts)
            for token in engine.reserved_tokens:
                if any(token in t for t in texts):
                    raise APIError(400, f"messages[{i}] contains the reserved token {token!r}; volumes are sent as "
                                        "input_volume parts", param=f"messages[{i}]")
            if role != "user":
                if vols or written:
                    raise APIError(400, f"messages[{i}]: only user messages carry volumes", param=f"messages[{i}]")
                if role in ("system", "developer"):
                    system.append(" ".join(texts))
                else:
                    turns.append((role, " ".join(texts)))
                continue
            if written and written != len(vols):
                raise APIError(400, f"messages[{i}]: {written} {_IMAGE} placeholder(s) in the text but {len(vols)} "
                                    "input_volume part(s); write none (volumes go where their parts are) or one each",
                               param=f"messages[{i}]")
            pieces = [p["text"] if p["type"] == "text" else ("" if written else _IMAGE) for p in parts]
            text = " ".join(p.strip() for p in pieces if p.strip())
            for k, v in enumerate(vols):
                volumes.append(_volume(v.get("input_volume"), who, f"messages[{i}].content[{k}]"))
            turns.append((role, text))
        if len(volumes) > settings.max_images:
            raise APIError(400, f"{len(volumes)} volumes in one request; the limit is {settings.max_images}",
                           param="messages")
        if not turns or turns[-1][0] != "user":
            raise APIError(400, "the last message must be the user's", param="messages")
        return turns, ("\n".join(system) if system else None), volumes

    def parse_params(body: dict) -> GenerationParams:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, 1, settings.max_tokens_limit,
                             settings.default_max_tokens)
        temperature = _number(body, "temperature", float, 0.0, 2.0, None)
        top_p = _number(body, "top_p", float, 0.0, 1.0, None)
        seed = _number(body, "seed", int, -(2**63), 2**63 - 1, None)
        if _number(body, "n", int, 1, 1, 1) != 1:
            raise APIError(400, "n must be 1", param="n")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        return GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                seed=None if seed is None else seed % (2**63), stop=stop)

    def radfm3d_field(result: Any, volumes: list[_VolumeRef], prepare_s: float) -> dict[str, Any]:
        images = []
        for ref, item in zip(volumes, result.images):
            images.append({"index": item["index"], **ref.source, "geometry": ref.geometry,
                           "grid_geometry": item["grid_geometry"], "boxes": item["boxes"],
                           "reading": item.get("reading")})
        return {"content": result.text, "images": images, "recipe": engine.processor.recipe.to_dict(),
                "timings_s": {"prepare_volumes": prepare_s, **result.timings_s},
                "usage_note": "boxes are placed on every image of the request; with several images the answer does "
                              "not say which one a box belongs to" if len(volumes) > 1 else None}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        who = owner(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the body is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
        turns, system, volumes = parse_chat(body, who)
        params = parse_params(body)
        stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage", False))
        prompt, formatted = engine.format_conversation(turns, system)
        estimate = engine.estimate_prompt_tokens(prompt, len(volumes))
        if estimate > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt is about {estimate} tokens with its volumes; the limit is "
                                f"{settings.max_prompt_tokens}", code="context_length_exceeded", param="messages")
        if state["pending"] >= settings.max_pending:
            raise APIError(429, f"the server is busy ({state['pending']} requests queued); retry shortly",
                           type="rate_limit_error", code="queue_full")
        state["pending"] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state["pending"] -= 1

        try:
            t0 = time.perf_counter()
            prepared = [await run_in_threadpool(engine.prepare, v.key, v.loader) for v in volumes]
            prepare_s = time.perf_counter() - t0
        except BaseException:
            release()
            raise
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(settings.request_timeout_s, cancel.set)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())

        def run(on_delta: Any = None) -> Any:
            return engine.generate(prompt, prepared, params, formatted=formatted, on_delta=on_delta, cancel=cancel,
                                   max_prompt_tokens=settings.max_prompt_tokens)

        if not stream:
            try:
                future = loop.run_in_executor(None, run)
                try:
                    result = await asyncio.shield(future)
                except asyncio.CancelledError:  # client went away
                    cancel.set()
                    raise
                except Cancelled:
                    raise APIError(504, f"the request waited over {settings.request_timeout_s:g} s",
                                   type="timeout_error", code="timeout") from None
                if result.finish_reason == "cancelled":
                    raise APIError(504, f"generation ran over {settings.request_timeout_s:g} s and was stopped",
                                   type="timeout_error", code="timeout")
            finally:
                timer.cancel()
                release()
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": engine.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                 "finish_reason": result.finish_reason, "logprobs": None}],
                    "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                              "total_tokens": result.prompt_tokens + result.completion_tokens},
                    "radfm3d": radfm3d_field(result, volumes, prepare_s)}

        queue: asyncio.Queue = asyncio.Queue()

        def on_delta(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", text))

        def worker() -> None:
            try:
                result = run(on_delta)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except Cancelled:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", APIError(
                    504, "the request timed out waiting for the model", type="timeout_error", code="timeout")))
            except RadFM3DInputError as err:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", APIError(400, str(err), code="invalid_input")))
            except Exception:  # noqa: BLE001 - logged, answered without details
                logger.exception("generation failed")
                loop.call_soon_threadsafe(queue.put_nowait, ("error", APIError(
                    500, "internal server error (details are in the server log)", type="server_error")))

        def chunk(delta: dict, finish: str | None, **extra: Any) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": engine.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                           "logprobs": None}], **extra}
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> Any:
            stop = params.stop
            hold = max((len(s) for s in stop), default=1) - 1
            text = ""
            sent = 0
            try:
                loop.run_in_executor(None, worker)
                yield chunk({"role": "assistant", "content": ""}, None)
                while True:
                    kind, value = await queue.get()
                    if kind == "delta":
                        text += value
                        cut = min([text.find(s) for s in stop if s in text], default=-1)
                        safe = cut if cut >= 0 else max(sent, len(text) - hold)
                        if safe > sent:
                            yield chunk({"content": text[sent:safe]}, None)
                            sent = safe
                        continue
                    if kind == "error":
                        yield f"data: {json.dumps(value.body())}\n\n"
                        break
                    result = value
                    final = result.text
                    if len(final) > sent and final[:sent] == text[:sent]:
                        yield chunk({"content": final[sent:]}, None)
                    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                             "total_tokens": result.prompt_tokens + result.completion_tokens}
                    extra: dict[str, Any] = {"radfm3d": radfm3d_field(result, volumes, prepare_s)}
                    if include_usage:
                        extra["usage"] = usage
                    yield chunk({}, result.finish_reason, **extra)
                    break
                yield "data: [DONE]\n\n"
            finally:
                timer.cancel()
                release()

        async def guarded() -> Any:
            finished = False
            try:
                async for item in events():
                    yield item
                finished = True
            finally:
                if not finished:  # client disconnected: stop generating
                    cancel.set()

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_middleware(BodyLimitMiddleware, upload_limit=settings.files.max_upload_bytes + (1 << 20),
                       default_limit=settings.max_json_bytes)
    return app


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radfm3d serve", description="Serve a radfm3d model over an OpenAI-compatible HTTP API.")
    parser.add_argument("model", help="model folder (e.g. bundles/radfm3d_demo/models/model) or preset name")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; any other address "
                                                             "needs --api-key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=[],
                        help="accepted bearer key (repeatable; also RADFM3D_API_KEY, comma-separated)")
    parser.add_argument("--allow-dir", default=None,
                        help="folder whose scans clients may name by relative path (input_volume.path)")
    parser.add_argument("--model-id", default=None, help="the name clients send as 'model' (default: folder name)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-upload-mb", type=float, default=512.0)
    parser.add_argument("--max-voxels", type=int, default=200_000_000)
    parser.add_argument("--max-read-mb", type=float, default=4096.0, help="memory one scan read may take")
    parser.add_argument("--file-ttl-s", type=float, default=3600.0, help="uploaded files expire after this")
    parser.add_argument("--max-stored-mb", type=float, default=4096.0, help="bytes stored per API key")
    parser.add_argument("--max-tokens-limit", type=int, default=1024)
    parser.add_argument("--max-prompt-chars", type=int, default=8000)
    parser.add_argument("--max-pending", type=int, default=32, help="queued requests before 429")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per-request limit (504 beyond it)")
    parser.add_argument("--log-level", default="info")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Validated :class:`ServeSettings` from parsed CLI arguments (refuses a non-loopback bind without a key)."""
    keys = list(args.api_key) + [k.strip() for k in os.environ.get("RADFM3D_API_KEY", "").split(",") if k.strip()]
    if not is_loopback(args.host) and not keys:
        raise RadFM3DInputError("--host", f"{args.host} is reachable from other machines: give --api-key (or "
                                          "RADFM3D_API_KEY), or bind 127.0.0.1")
    allow = None
    if args.allow_dir:
        allow = Path(args.allow_dir).expanduser()
        if not allow.is_dir():
            raise RadFM3DInputError(args.allow_dir, "--allow-dir is not a folder")
    limits = FileLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_voxels=args.max_voxels,
                        ttl_s=args.file_ttl_s, max_bytes_per_owner=int(args.max_stored_mb * 2**20),
                        max_read_bytes=int(args.max_read_mb * 2**20))
    return ServeSettings(api_keys=keys, allow_dir=allow, files=limits, max_tokens_limit=args.max_tokens_limit,
                         max_prompt_chars=args.max_prompt_chars, max_pending=args.max_pending,
                         request_timeout_s=args.timeout_s)


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d serve MODEL [--host 127.0.0.1 --port 8000 --api-key KEY --allow-dir DIR]``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = settings_from_args(args)
    try:
        import uvicorn
    except ImportError as err:  # pragma: no cover
        raise RadFM3DInputError("serve", "needs fastapi, uvicorn and python-multipart: "
                                         "pip install fastapi uvicorn python-multipart") from err
    from radfm3d.serve.engine import Engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, model_id=args.model_id)
    app = create_app(engine, settings)
    print(f"radfm3d serve: model {engine.model_id!r} on http://{args.host}:{args.port} "
          f"({'API key required' if settings.api_keys else 'no API key: loopback only'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False)
    return 0
