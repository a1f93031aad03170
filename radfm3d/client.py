# Copyright (c) radfm3d contributors. Apache-2.0.
"""A small, torch-free client of ``radfm3d serve`` (Python standard library only, so it runs in 3D Slicer's Python
and anywhere else without installing anything)::

    from radfm3d.client import RadFM3DClient

    client = RadFM3DClient("http://127.0.0.1:8000", api_key="...")
    scan = client.upload("ct.nii.gz")                      # or a DICOM folder (sent as a zip)
    answer = client.ask([scan["id"]], "Locate the liver.", max_tokens=64)
    answer.text, answer.boxes                              # boxes of the first image: voxel indices and RAS mm
    for piece in client.ask([scan["id"]], "Describe.", stream=True, on_delta=print).text: ...

:class:`radfm3d.slicer.LocalRunner` has the same ``upload`` / ``ask`` shape for the in-process model.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radfm3d.errors import RadFM3DError

__all__ = ["Answer", "RadFM3DClient", "RadFM3DClientError", "volume_parts"]


class RadFM3DClientError(RadFM3DError):
    """The server refused a request (``status``, OpenAI error ``code``) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Answer:
    """One answer: ``text``, why it ended, per-image results (``images[k]["boxes"]``: each box with ``box_0_99``,
    ``box_voxel``, ``box_world_mm``, ``corners_world_mm``, ``centre_world_mm``, ``size_mm``), token usage, timings
    and the raw response."""

    text: str
    finish_reason: str | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def boxes(self) -> list[dict[str, Any]]:
        """Boxes placed on the first image (the common one-scan case)."""
        return list(self.images[0].get("boxes", [])) if self.images else []

    @classmethod
    def from_response(cls, body: dict[str, Any]) -> Answer:
        """From a ``chat.completion`` body (or the final stream chunk with its ``radfm3d`` field)."""
        extra = body.get("radfm3d") or {}
        choice = (body.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content")
        return cls(text=extra.get("content", text) if text is None else text, finish_reason=choice.get("finish_reason"),
                   images=list(extra.get("images", [])), usage=dict(body.get("usage") or {}),
                   timings_s=dict(extra.get("timings_s") or {}), raw=body)


def volume_parts(file_ids: Sequence[str]) -> list[dict[str, Any]]:
    """``input_volume`` content parts for uploaded file ids."""
    return [{"type": "input_volume", "input_volume": {"file_id": str(f)}} for f in file_ids]


def _zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


class RadFM3DClient:
    """Client of one ``radfm3d serve`` server.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"`` (a trailing ``/v1`` is accepted).
        api_key: the bearer key (default: ``RADFM3D_API_KEY`` from the environment, else none).
        model: the model id to ask (default: the server's first model).
        timeout: seconds per request.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0) -> None:
        url = base_url.rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.api_key = api_key if api_key is not None else os.environ.get("RADFM3D_API_KEY") or None
        self._model = model
        self.timeout = float(timeout)
        host = (urllib.parse.urlsplit(self.base_url).hostname or "").lower()
        # a server on this machine is never reached through an HTTP proxy set in the environment
        loopback = host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else \
            urllib.request.build_opener()

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 stream: bool = False, auth: bool = True) -> Any:
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if auth and self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=body, headers=headers, method=method)
        try:
            resp = self._opener.open(req, timeout=self.timeout)  # noqa: S310 - the user's own server URL
        except urllib.error.HTTPError as err:
            try:
                payload = json.loads(err.read() or b"{}").get("error", {})
            except (json.JSONDecodeError, AttributeError):
                payload = {}
            raise RadFM3DClientError(err.code, payload.get("message") or err.reason, payload.get("code")) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RadFM3DClientError(0, f"cannot reach {self.base_url}: {reason}") from None
        if stream:
            return resp
        with resp:
            return json.loads(resp.read() or b"{}")

    def _json(self, method: str, path: str, payload: Any) -> Any:
        return self._request(method, path, json.dumps(payload).encode(), "application/json")

    # ------------------------------------------------------------------ server
    def health(self) -> dict[str, Any]:
        """``GET /health`` (no key needed): ``{"status": "ok", "model": ...}``."""
        return self._request("GET", "/health", auth=False)

    def models(self) -> list[dict[str, Any]]:
        """The served models with their base LLM, preprocessing recipe and versions."""
        return list(self._request("GET", "/v1/models").get("data", []))

    def test_connection(self) -> str:
        """A one-line status: reachable, key accepted, which model (raises :class:`RadFM3DClientError` if not)."""
        self.health()
        models = self.models()
        return f"connected to {self.base_url}: model {models[0]['id'] if models else '?'}"

    @property
    def model(self) -> str:
        if self._model is None:
            models = self.models()
            if not models:
                raise RadFM3DClientError(0, f"{self.base_url} serves no model")
            self._model = str(models[0]["id"])
        return self._model

    # ------------------------------------------------------------------ files
    def upload(self, path: str | os.PathLike, filename: str | None = None) -> dict[str, Any]:
        """Upload a scan file (.nii/.nii.gz/.nrrd/.mha) or a DICOM-series folder (zipped in memory); returns the
        file object (``id``, ``bytes``, ``filename``, ``geometry``)."""
        path = Path(path)
        if path.is_dir():
            data, name = _zip_folder(path), (filename or path.name) + ".zip"
        elif path.is_file():
            data, name = path.read_bytes(), filename or path.name
        else:
            raise RadFM3DClientError(0, f"{path}: no such file or folder")
        return self.upload_bytes(data, name)

    def upload_bytes(self, data: bytes, filename: str, purpose: str = "vision") -> dict[str, Any]:
        """Upload scan bytes under ``filename`` (its suffix tells the format)."""
        boundary = "radfm3d-" + secrets.token_hex(12)
        safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe_name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode(),
            data, f"\r\n--{boundary}--\r\n".encode()])
        return self._request("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")

    def get_file(self, file_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/files/{file_id}")

    def list_files(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/files").get("data", []))

    def delete(self, file_id: str) -> bool:
        return bool(self._request("DELETE", f"/v1/files/{file_id}").get("deleted"))

    # ------------------------------------------------------------------ chat
    def ask(self, file_ids: Sequence[str] | str, prompt: str, *, max_tokens: int = 256,
            temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
            stop: Sequence[str] | None = None, history: Sequence[dict[str, Any]] | None = None,
            stream: bool = False, on_delta: Callable[[str], None] | None = None,
            cancel: threading.Event | None = None) -> Answer:
        """Ask about the uploaded scans: volumes first, then ``prompt``. ``history``: earlier OpenAI messages.
        With ``stream`` (or ``on_delta``) text pieces go to ``on_delta`` as they arrive, and setting ``cancel``
        closes the connection, which stops generation on the server. Returns the final :class:`Answer`."""
        ids = [file_ids] if isinstance(file_ids, str) else list(file_ids)
        content = volume_parts(ids) + [{"type": "text", "text": str(prompt)}]
        payload: dict[str, Any] = {"model": self.model, "max_tokens": int(max_tokens),
                                   "messages": [*(history or []), {"role": "user", "content": content}]}
        for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
            if value is not None:
                payload[name] = value
        if stop:
            payload["stop"] = list(stop)
        if not (stream or on_delta):
            return Answer.from_response(self._json("POST", "/v1/chat/completions", payload))
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        text, final = [], None
        for chunk in self._events(payload, cancel):
            choice = (chunk.get("choices") or [{}])[0]
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                text.append(piece)
                if on_delta is not None:
                    on_delta(piece)
            if choice.get("finish_reason") is not None or "radfm3d" in chunk:
                final = chunk
        if final is None:
            return Answer(text="".join(text), finish_reason="cancelled" if cancel and cancel.is_set() else None)
        answer = Answer.from_response(final)
        answer.text = "".join(text) if not final.get("radfm3d") else answer.text
        return answer

    def _events(self, payload: dict[str, Any], cancel: threading.Event | None) -> Iterator[dict[str, Any]]:
        resp = self._request("POST", "/v1/chat/completions", json.dumps(payload).encode(), "application/json",
                             stream=True)
        with resp:
            for raw in resp:
                if cancel is not None and cancel.is_set():
                    return
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:  # an error after the stream started: its status from its type
                    err = event["error"]
                    status = {"invalid_request_error": 400, "timeout_error": 504}.get(str(err.get("type")), 500)
                    raise RadFM3DClientError(status, err.get("message", "stream error"), err.get("code"))
                yield event
