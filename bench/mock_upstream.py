"""Fast fake OpenAI-compatible upstream for Boundless tests and benchmarks (stdlib only).

Who uses it: the benchmark (``bench/run.py``, ``bench/targets.py``), the tests' fake provider (the ``mock``
fixture in ``tests/conftest.py`` and ``tests/support.py``), and the README's offline trial
(``config/offline.toml`` points ``mock-chat`` and ``mock-paid`` at it). It lives in ``bench/`` so that all three
find it from the repository root as ``python -m bench.mock_upstream``.

Run from the repo root::

    python -m bench.mock_upstream --host 127.0.0.1 --port 9100 \\
        [--ttfb 0] [--chunks 20] [--gap 0.005] [--latency 0] [--no-record]

It prints ``mock upstream listening on http://127.0.0.1:PORT`` when ready (``--port 0`` picks a
free port) and exits cleanly on SIGTERM/SIGINT. Uses uvloop when importable.

Endpoints: ``POST .../chat/completions`` (the fake model), ``POST .../embeddings``, ``POST .../responses``
(OpenAI's Responses API, JSON and SSE ending with ``response.completed``), ``POST .../messages`` (Anthropic's
Messages API, JSON and SSE: ``message_start`` ... ``message_stop``; its errors in Anthropic's shape),
``GET .../models``, ``GET /_mock/requests`` (recorded model requests with their headers, last 1000),
``POST /_mock/reset``, ``GET /_mock/health``; anything else is a 404 with an OpenAI-shaped error.

The knobs below work on every model endpoint unless they say otherwise (``split_utf8``, ``gzip``,
``set_cookie``, ``echo_headers``, ``close_delimited`` are chat's only; ``cut_after`` on the other APIs' streams
counts their delta events). Embeddings: one vector of ``dimensions`` (default 8) floats per input, as base64
float32 when ``encoding_format`` is ``"base64"``; ``prompt_tokens`` = words of each string input + length of
each token array. Responses and Messages count input tokens as chat does (words of the text, + 4 per
message or input item, + the words of ``instructions`` / ``system``); ``usage`` replaces what they report
(Messages: the ``message_start`` gets all but ``output_tokens``, the ``message_delta`` that).

Per-request knobs go in the chat body as ``"mock": {...}`` (all optional):

* ``status`` (+ ``error`` object): answer at once with that status and ``{"error": error}``.
* ``raw_status`` / ``raw_body`` / ``raw_content_type``: answer with exactly that.
* ``ttfb``, ``chunks``, ``gap``, ``latency``: override the server defaults (a non-stream
  answer waits ``ttfb + latency``).
* ``hang`` (s): sleep before sending anything.
* ``cut_after`` (N): stream: drop the connection after N content chunks (no ``[DONE]``, no
  terminating chunk); non-stream: send half the body under the full Content-Length, then close.
* ``stall_after`` (N) + ``stall`` (s): pause after N content chunks, then continue.
* ``content``: text to answer; streamed as ``chunks`` equal pieces if ``chunks`` is given,
  else one piece per word (spaces kept). Default ``"tok0 tok1 ... tok{chunks-1}"``.
* ``split_utf8``: write each stream event in two TCP writes, cutting a multi-byte character.
* ``gzip``: compress the answer (``Content-Encoding: gzip``) whatever the client accepts; a stream's events
  are each flushed, so they stay decodable one by one.
* ``usage`` (object) replaces the computed usage; ``no_usage`` never sends usage.
* ``set_cookie``: add ``Set-Cookie: mock_session=abc; Path=/``.
* ``echo_headers``: non-stream answer gets the request headers under ``"echo_headers"``.
* ``close_delimited``: stream without chunked encoding, closing the connection at the end.

Usage: ``completion_tokens`` = number of content chunks; ``prompt_tokens`` = words in the
messages' text + 4 per message. ``MockUpstream`` runs the server in a subprocess for tests.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import gzip
import http
import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_RECORDS = 1000
DEFAULT_ERROR = {"message": "mock error", "type": "server_error", "param": None, "code": None}
MODELS = {"object": "list", "data": [{"id": "mock-model", "object": "model", "owned_by": "mock"}]}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_WORD_PIECES = re.compile(r"\s*\S+")

Headers = Sequence[tuple[str, str]]


class BadRequest(Exception):
    """The request could not be parsed; answered with a 400."""


@dataclass(slots=True)
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class Defaults:
    ttfb: float = 0.0
    chunks: int = 20
    gap: float = 0.005
    latency: float = 0.0


# --------------------------------------------------------------------------- HTTP


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """Read one request; None on a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("truncated request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines = head.decode("latin-1").strip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    method, path, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        if not headers["content-length"].isdigit():
            raise BadRequest("invalid Content-Length")
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = b""
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return Request(method, path, version, headers, body, keep_alive)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        try:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("invalid chunk size") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # skip trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("missing CRLF after chunk")


@functools.lru_cache(maxsize=64)
def _status_line(status: int) -> str:
    try:
        return f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
    except ValueError:
        return f"HTTP/1.1 {status} Unknown\r\n"


def response_head(status: int, headers: Headers) -> bytes:
    return (_status_line(status) + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def plain_response(status: int, body: bytes, content_type: str, keep_alive: bool,
                   extra: Headers = (), length: int | None = None) -> bytes:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body) if length is None else length))]
    if not keep_alive:
        headers.append(("Connection", "close"))
    return response_head(status, [*headers, *extra]) + body


def json_response(status: int, payload: Any, keep_alive: bool, extra: Headers = ()) -> bytes:
    return plain_response(status, _dumps(payload).encode(), "application/json", keep_alive, extra)


def openai_error(message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def _chunk_frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Connection(asyncio.StreamReaderProtocol):
    """A client connection: asyncio streams, plus immediate notice when the peer hangs up.

    While a chat response is in flight (``record`` set), an EOF or reset from the peer marks
    the record ``client_closed`` at once and wakes any pending pause. (So a client that
    half-closes its side after sending the request counts as gone.)
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def __init__(self, server: MockServer) -> None:
        self.loop = asyncio.get_running_loop()
        super().__init__(asyncio.StreamReader(loop=self.loop), self._connected, loop=self.loop)
        self.server = server
        server.connections += 1
        self.serial = server.connections         # recorded with each request: which connection carried it
        self.peer_gone = False
        self.waiter: asyncio.Future | None = None
        self.record: dict | None = None

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        self.reader, self.writer = reader, writer
        return self.server.handle_connection(self)

    def eof_received(self) -> bool | None:
        self.hang_up()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.hang_up()
        super().connection_lost(exc)

    def hang_up(self) -> None:
        self.peer_gone = True
        rec = self.record
        if rec is not None and not rec["completed"] and not rec["client_closed"]:
            rec["client_closed"] = True
            rec["closed_at"] = time.time()
        if self.waiter is not None:
            _wake(self.waiter)

    async def send(self, data: bytes, split_utf8: bool = False) -> bool:
        """Write data (draining if it backs up); False if the peer is gone."""
        writer = self.writer
        try:
            if split_utf8 and (cut := _utf8_split_point(data)):
                writer.write(data[:cut])
                await writer.drain()
                if not await self.pause(0.002):  # let the first half leave as its own segment
                    return False
                data = data[cut:]
            writer.write(data)
            if writer.transport.get_write_buffer_size():
                await writer.drain()
        except OSError:
            pass
        if self.peer_gone or writer.transport.is_closing():  # a failed send closes the transport
            self.hang_up()
            return False
        return True

    async def pause(self, seconds: float) -> bool:
        """Sleep, waking early if the peer hangs up; False if it did."""
        if seconds > 0 and not self.peer_gone:
            waiter = self.waiter = self.loop.create_future()
            timer = self.loop.call_later(seconds, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        return not self.peer_gone

    def cut(self) -> None:
        """Drop the connection abruptly, mid-response."""
        self.writer.transport.abort()
        if self.record is not None:
            self.record["closed_at"] = time.time()


# --------------------------------------------------------------------------- fake model


@functools.lru_cache(maxsize=64)
def _default_pieces(chunks: int) -> tuple[str, ...]:
    return tuple(f"tok{i}" if i == 0 else f" tok{i}" for i in range(chunks))


def content_pieces(content: str | None, chunks: int, chunks_given: bool) -> list[str]:
    if content is None:
        return list(_default_pieces(chunks))
    if not chunks_given:  # one piece per word, whitespace kept with the following word
        pieces = _WORD_PIECES.findall(content)
        rest = content[sum(map(len, pieces)):]
        if rest:
            pieces = [*pieces[:-1], pieces[-1] + rest] if pieces else [rest]
        return pieces
    n = max(1, min(chunks, len(content)))
    return [content[i * len(content) // n:(i + 1) * len(content) // n] for i in range(n)]


def prompt_tokens(messages: Any) -> int:
    total = 0
    for message in messages if isinstance(messages, list) else ():
        total += 4
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            total += sum(len(p["text"].split()) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def _utf8_split_point(data: bytes) -> int:
    """Index just after the lead byte of the first multi-byte UTF-8 character (0 if none)."""
    return next((i + 1 for i, byte in enumerate(data) if byte >= 0xC0), 0)


def _opt_int(knobs: dict, name: str) -> int | None:
    return None if knobs.get(name) is None else int(knobs[name])


class MockServer:
    def __init__(self, defaults: Defaults, record: bool = True) -> None:
        self.defaults = defaults
        self.record = record
        self.records: deque[dict] = deque(maxlen=MAX_RECORDS)
        self.seq = 0
        self.connections = 0

    async def handle_connection(self, conn: Connection) -> None:
        try:
            while (req := await read_request(conn.reader, conn.writer)) is not None:
                if not await self.dispatch(conn, req) or not req.keep_alive:
                    break
        except BadRequest as exc:
            conn.writer.write(json_response(400, openai_error(str(exc)), keep_alive=False))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # shutdown; ending normally keeps 3.11's stream callback from logging a traceback
        finally:
            conn.writer.close()

    async def dispatch(self, conn: Connection, req: Request) -> bool:
        """Answer one request; False when the connection must be closed."""
        path, status = req.path.split("?", 1)[0], 200
        if req.method == "POST" and path.endswith("/chat/completions"):
            return await self.chat(conn, req)
        if req.method == "POST" and path.endswith(("/embeddings", "/responses", "/messages")):
            return await self.chat(conn, req, self.other_apis[path.rsplit("/", 1)[1]])
        if req.method == "GET" and path.endswith("/models"):
            payload: Any = MODELS
        elif req.method == "GET" and path == "/_mock/requests":
            payload = list(self.records)
        elif req.method == "POST" and path == "/_mock/reset":
            self.records.clear()
            payload = {"ok": True}
        elif req.method == "GET" and path == "/_mock/health":
            payload = {"ok": True}
        else:
            status, payload = 404, openai_error(f"{req.method} {path} not found", "not_found")
        return await conn.send(json_response(status, payload, req.keep_alive))

    async def chat(self, conn: Connection, req: Request, answer: Callable | None = None) -> bool:
        try:
            body = json.loads(req.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return await conn.send(json_response(400, openai_error("body must be a JSON object"), req.keep_alive))
        knobs = body["mock"] if isinstance(body.get("mock"), dict) else {}
        self.seq += 1
        conn.record = record = {
            "id": self.seq, "connection": conn.serial, "method": req.method, "path": req.path, "headers": req.headers, "body": body,
            "stream": bool(body.get("stream")), "chunks_sent": 0, "completed": False, "client_closed": False,
            "closed_at": None, "started_at": time.time()}
        if self.record:
            self.records.append(record)
        try:
            keep = await (answer or self.answer)(conn, req, body, knobs)
        except (TypeError, ValueError) as exc:  # a knob of the wrong type (checked before any output)
            keep = await conn.send(json_response(400, openai_error(f"bad mock knob: {exc}"), req.keep_alive))
        finally:
            conn.record = None
        if record["closed_at"] is None:
            record["closed_at"] = time.time()
        return keep

    async def answer(self, conn: Connection, req: Request, body: dict, knobs: dict) -> bool:
        extra = [("Set-Cookie", "mock_session=abc; Path=/")] if knobs.get("set_cookie") else []
        if not await conn.pause(float(knobs.get("hang", 0))):
            return False
        if "raw_status" in knobs:
            return await self.finish(conn, req, plain_response(
                int(knobs["raw_status"]), str(knobs.get("raw_body", "")).encode(),
                str(knobs.get("raw_content_type", "text/plain")), req.keep_alive, extra))
        if "status" in knobs:
            error = knobs.get("error", DEFAULT_ERROR)
            return await self.finish(conn, req, json_response(int(knobs["status"]), {"error": error},
                                                              req.keep_alive, extra))
        content = knobs.get("content")
        pieces = content_pieces(None if content is None else str(content),
                                int(knobs.get("chunks", self.defaults.chunks)), "chunks" in knobs)
        usage = knobs.get("usage")
        if usage is None:
            prompt = prompt_tokens(body.get("messages"))
            usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces), "total_tokens": prompt + len(pieces)}
        if knobs.get("no_usage"):
            usage = None
        if body.get("stream"):
            return await self.stream(conn, req, body, knobs, pieces, usage, extra)

        if not await conn.pause(float(knobs.get("ttfb", self.defaults.ttfb))
                                + float(knobs.get("latency", self.defaults.latency))):
            return False
        payload: dict[str, Any] = {
            "id": f"chatcmpl-mock-{conn.record['id']}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": "stop"}]}
        if usage is not None:
            payload["usage"] = usage
        if knobs.get("echo_headers"):
            payload["echo_headers"] = req.headers
        data = _dumps(payload).encode()
        if knobs.get("gzip"):                   # compressed although the client asked for identity
            data, extra = gzip.compress(data), [*extra, ("Content-Encoding", "gzip")]
        if _opt_int(knobs, "cut_after") is None:
            return await self.finish(conn, req, plain_response(200, data, "application/json", req.keep_alive, extra))
        if await conn.send(plain_response(200, data[:len(data) // 2], "application/json", True, extra, len(data))):
            conn.cut()
        return False

    async def stream(self, conn: Connection, req: Request, body: dict, knobs: dict, pieces: list[str],
                     usage: dict | None, extra: Headers) -> bool:
        ttfb = float(knobs.get("ttfb", self.defaults.ttfb))
        gap = float(knobs.get("gap", self.defaults.gap))
        cut_after, stall_after = _opt_int(knobs, "cut_after"), _opt_int(knobs, "stall_after")
        stall = float(knobs.get("stall", 0))
        split_utf8 = bool(knobs.get("split_utf8"))
        close_delimited = bool(knobs.get("close_delimited")) or req.version == "HTTP/1.0"
        frame: Callable[[bytes], bytes] = bytes if close_delimited else _chunk_frame
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        record = conn.record
        # Every event shares this prefix and suffix; only the choices vary.
        prefix = ('data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,"choices":'
                  % (_dumps(f"chatcmpl-mock-{record['id']}"), int(time.time()), _dumps(body.get("model"))))
        suffix = ',"usage":null}\n\n' if include_usage else "}\n\n"

        gz = zlib.compressobj(wbits=31) if knobs.get("gzip") else None

        def encode(data: bytes) -> bytes:       # gzip: each event flushed so that it can be decoded at once
            return gz.compress(data) + gz.flush(zlib.Z_SYNC_FLUSH) if gz else data

        def event(delta: str, finish: str = "null") -> bytes:
            return frame(encode(
                f'{prefix}[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]{suffix}'.encode()))

        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                   ("Connection", "close") if close_delimited else ("Transfer-Encoding", "chunked"), *extra]
        if gz:
            headers.append(("Content-Encoding", "gzip"))
        if not await conn.pause(ttfb):
            return False
        if not await conn.send(response_head(200, headers) + event('{"role":"assistant","content":""}')):
            return False
        for i in range(len(pieces) + 1):
            if i == cut_after:
                conn.cut()
                return False
            if i == stall_after and not await conn.pause(stall):
                return False
            if i == len(pieces):
                break
            if not (await conn.pause(gap) and
                    await conn.send(event('{"content":%s}' % _dumps(pieces[i])), split_utf8)):
                return False
            record["chunks_sent"] += 1
        tail = event("{}", '"stop"')
        if include_usage and usage is not None:
            tail += frame(encode(f'{prefix}[],"usage":{_dumps(usage)}}}\n\n'.encode()))
        tail += frame(encode(b"data: [DONE]\n\n"))
        if gz:
            tail += frame(gz.flush())
        tail += b"" if close_delimited else b"0\r\n\r\n"
        return await self.finish(conn, req, tail) and not close_delimited

    # ----------------------------------------------------------------------- the other APIs

    @property
    def other_apis(self) -> dict[str, Callable]:
        return {"embeddings": self.embeddings, "responses": self.responses, "messages": self.messages}

    async def early(self, conn: Connection, req: Request, knobs: dict, anthropic: bool = False) -> bool | None:
        """The knobs that answer before the model does (hang, raw_status, status); None to go on."""
        if not await conn.pause(float(knobs.get("hang", 0))):
            return False
        if "raw_status" in knobs:
            return await self.finish(conn, req, plain_response(
                int(knobs["raw_status"]), str(knobs.get("raw_body", "")).encode(),
                str(knobs.get("raw_content_type", "text/plain")), req.keep_alive))
        if "status" in knobs:
            if anthropic:
                error = {"type": "error", "error": knobs.get("error", {"type": "api_error", "message": "mock error"})}
            else:
                error = {"error": knobs.get("error", DEFAULT_ERROR)}
            return await self.finish(conn, req, json_response(int(knobs["status"]), error, req.keep_alive))
        return None

    def _pieces(self, knobs: dict) -> list[str]:
        content = knobs.get("content")
        return content_pieces(None if content is None else str(content),
                              int(knobs.get("chunks", self.defaults.chunks)), "chunks" in knobs)

    async def embeddings(self, conn: Connection, req: Request, body: dict, knobs: dict) -> bool:
        if (done := await self.early(conn, req, knobs)) is not None:
            return done
        given = body.get("input")
        items = [given] if isinstance(given, str) or (
            isinstance(given, list) and given and all(isinstance(t, int) for t in given)) else list(given or [])
        dims = int(body.get("dimensions") or 8)
        data, prompt = [], 0
        for i, item in enumerate(items):
            prompt += len(item.split()) if isinstance(item, str) else len(item)
            vector = [round((i + 1) * 0.001 * (j + 1), 6) for j in range(dims)]
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        payload: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
        usage = knobs.get("usage") or {"prompt_tokens": prompt, "total_tokens": prompt}
        if not knobs.get("no_usage"):
            payload["usage"] = usage
        if not await conn.pause(float(knobs.get("latency", self.defaults.latency))):
            return False
        return await self.finish(conn, req, json_response(200, payload, req.keep_alive))

    async def responses(self, conn: Connection, req: Request, body: dict, knobs: dict) -> bool:
        if (done := await self.early(conn, req, knobs)) is not None:
            return done
        pieces = self._pieces(knobs)
        given = body.get("input")
        items = [{"content": given}] if isinstance(given, str) else given
        prompt = prompt_tokens(items) + len(str(body.get("instructions") or "").split())
        usage = knobs.get("usage") or {"input_tokens": prompt, "output_tokens": len(pieces),
                                       "total_tokens": prompt + len(pieces)}
        n = conn.record["id"]
        text = "".join(pieces)

        def item(status: str, content: list) -> dict:
            return {"type": "message", "id": f"msg_mock{n}", "status": status, "role": "assistant",
                    "content": content}

        part = {"type": "output_text", "text": text, "annotations": []}

        def response(status: str, output: list, with_usage: bool) -> dict:
            out = {"id": f"resp_mock{n}", "object": "response", "created_at": int(time.time()), "status": status,
                   "model": body.get("model"), "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
                   "tools": [], "usage": None}
            if with_usage and not knobs.get("no_usage"):
                out["usage"] = usage
            return out

        if not body.get("stream"):
            return await self.finish(conn, req, json_response(
                200, response("completed", [item("completed", [part])], True), req.keep_alive))
        seq = iter(range(1 << 30))

        def event(kind: str, **fields: Any) -> bytes:
            return f"event: {kind}\ndata: {_dumps({'type': kind, 'sequence_number': next(seq), **fields})}\n\n".encode()

        loc = {"item_id": f"msg_mock{n}", "output_index": 0, "content_index": 0}
        head = [event("response.created", response=response("in_progress", [], False)),
                event("response.in_progress", response=response("in_progress", [], False)),
                event("response.output_item.added", output_index=0, item=item("in_progress", [])),
                event("response.content_part.added", **loc, part={**part, "text": ""})]
        deltas = [event("response.output_text.delta", **loc, delta=p) for p in pieces]
        tail = [event("response.output_text.done", **loc, text=text),
                event("response.content_part.done", **loc, part=part),
                event("response.output_item.done", output_index=0, item=item("completed", [part])),
                event("response.completed", response=response("completed", [item("completed", [part])], True))]
        return await self.events(conn, req, knobs, head, deltas, tail)

    async def messages(self, conn: Connection, req: Request, body: dict, knobs: dict) -> bool:
        if (done := await self.early(conn, req, knobs, anthropic=True)) is not None:
            return done
        pieces = self._pieces(knobs)
        system = body.get("system")
        prompt = prompt_tokens(body.get("messages")) + prompt_tokens([{"content": system}] if system else [])
        usage = knobs.get("usage") or {"input_tokens": prompt, "output_tokens": len(pieces),
                                       "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        n = conn.record["id"]

        def message(content: list, with_usage: dict | None) -> dict:
            out = {"id": f"msg_mock{n}", "type": "message", "role": "assistant", "model": body.get("model"),
                   "content": content, "stop_reason": None if with_usage is not usage else "end_turn",
                   "stop_sequence": None}
            if with_usage is not None and not knobs.get("no_usage"):
                out["usage"] = with_usage
            return out

        if not body.get("stream"):
            return await self.finish(conn, req, json_response(
                200, message([{"type": "text", "text": "".join(pieces)}], usage), req.keep_alive))

        def event(kind: str, **fields: Any) -> bytes:
            return f"event: {kind}\ndata: {_dumps({'type': kind, **fields})}\n\n".encode()

        start = {**{k: v for k, v in usage.items() if k != "output_tokens"}, "output_tokens": 1}
        head = [event("message_start", message=message([], start)),
                event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
                event("ping")]
        deltas = [event("content_block_delta", index=0, delta={"type": "text_delta", "text": p}) for p in pieces]
        delta: dict[str, Any] = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        if not knobs.get("no_usage"):
            delta["usage"] = {"output_tokens": usage.get("output_tokens", len(pieces))}
        tail = [event("content_block_stop", index=0), event("message_delta", **delta), event("message_stop")]
        return await self.events(conn, req, knobs, head, deltas, tail)

    async def events(self, conn: Connection, req: Request, knobs: dict, head: list[bytes], deltas: list[bytes],
                     tail: list[bytes]) -> bool:
        """Stream ``head`` at once, each delta after ``gap`` (``cut_after`` N: drop the connection after N), then
        ``tail``."""
        gap = float(knobs.get("gap", self.defaults.gap))
        cut_after = _opt_int(knobs, "cut_after")
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                   ("Transfer-Encoding", "chunked")]
        if not await conn.pause(float(knobs.get("ttfb", self.defaults.ttfb))):
            return False
        if not await conn.send(response_head(200, headers) + b"".join(_chunk_frame(e) for e in head)):
            return False
        for i in range(len(deltas) + 1):
            if i == cut_after:
                conn.cut()
                return False
            if i == len(deltas):
                break
            if not (await conn.pause(gap) and await conn.send(_chunk_frame(deltas[i]))):
                return False
            conn.record["chunks_sent"] += 1
        return await self.finish(conn, req, b"".join(_chunk_frame(e) for e in tail) + b"0\r\n\r\n")

    @staticmethod
    async def finish(conn: Connection, req: Request, data: bytes) -> bool:
        """Send the last bytes of a response and mark it completed."""
        if not await conn.send(data):
            return False
        conn.record["completed"] = True
        return req.keep_alive


# --------------------------------------------------------------------------- entry point


async def serve(host: str, port: int, defaults: Defaults, record: bool) -> None:
    mock = MockServer(defaults, record)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(mock), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock upstream listening on http://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttfb", type=float, default=0.0, help="seconds before a stream's first event")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per answer")
    parser.add_argument("--gap", type=float, default=0.005, help="seconds between stream chunks")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before a JSON answer")
    parser.add_argument("--no-record", action="store_true", help="do not record chat requests")
    args = parser.parse_args(argv)
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    defaults = Defaults(args.ttfb, args.chunks, args.gap, args.latency)
    asyncio.run(serve(args.host, args.port, defaults, not args.no_record))


# --------------------------------------------------------------------------- test helper


class MockUpstream:
    """Run the mock in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, ttfb: float = 0.0, chunks: int = 5, gap: float = 0.05, latency: float = 0.0,
                 record: bool = True) -> None:
        self.args = ["--ttfb", str(ttfb), "--chunks", str(chunks), "--gap", str(gap), "--latency", str(latency)]
        if not record:
            self.args.append("--no-record")
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.url = ""
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy env

    def start(self) -> MockUpstream:
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-m", "bench.mock_upstream", "--host", "127.0.0.1", "--port", "0", *self.args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(10)
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", lines[0]) if lines else None
        if not match:
            self.stop()
            raise RuntimeError(f"mock upstream did not start (got {lines!r})")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
        with self._opener.open(req, timeout=5) as resp:
            return json.loads(resp.read())

    def requests(self) -> list[dict]:
        return self._call("GET", "/_mock/requests")

    def last(self) -> dict:
        records = self.requests()
        if not records:
            raise LookupError("no request recorded")
        return records[-1]

    def reset(self) -> None:
        self._call("POST", "/_mock/reset")

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 10.0, interval: float = 0.05) -> dict | None:
        """Poll until a record (most recent first) matches predicate; None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            match = next((r for r in reversed(self.requests()) if predicate(r)), None)
            if match is not None or time.monotonic() >= deadline:
                return match
            time.sleep(interval)


if __name__ == "__main__":
    main()
