"""The cheapest possible Flask + requests pass-through, the baseline the gateway's own cost is measured against.

No auth, no limits, no billing, no JSON parsing: ``POST /v1/chat/completions`` forwards the body as is to
``$BENCH_UPSTREAM/chat/completions`` over a pooled ``requests.Session`` and relays the answer; an
``text/event-stream`` answer is streamed back chunk by chunk with ``resp.raw.read1`` (as the gateway does),
anything else is read whole; upstream connections are kept alive (as the gateway's). ``GET /v1/models`` is relayed the same way. Serve it like the gateway::

    BENCH_UPSTREAM=http://127.0.0.1:9100/v1 gunicorn -c bench/gunicorn_bare.conf.py --no-control-socket \\
        -b 127.0.0.1:8001 bench.bare_passthrough:app
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import requests
from flask import Flask
from flask import Response
from flask import request
from requests.adapters import HTTPAdapter

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9100/v1").rstrip("/")

app = Flask(__name__)
_session: requests.Session | None = None
_session_pid = 0


def session() -> requests.Session:
    """One pooled session per worker process (never one inherited across gunicorn's fork)."""
    global _session, _session_pid
    if _session_pid != os.getpid():
        s = requests.Session()
        s.trust_env = False
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=256)
        s.mount("http://", adapter)
        _session, _session_pid = s, os.getpid()
    return _session


def _relay(resp: requests.Response) -> Response:
    content_type = resp.headers.get("Content-Type", "application/json")
    if content_type.startswith("text/event-stream"):
        def chunks() -> Iterator[bytes]:
            complete = False
            try:
                while data := resp.raw.read1(65536):
                    yield data
                complete = True
            finally:
                if complete:                  # read to the end: the connection goes back to the pool
                    resp.raw.release_conn()
                else:
                    resp.close()
        return Response(chunks(), status=resp.status_code, content_type=content_type)
    body = resp.content                       # consumed, so close() keeps the connection for the next request
    resp.close()
    return Response(body, status=resp.status_code, content_type=content_type)


@app.post("/v1/chat/completions")
def chat_completions() -> Response:
    resp = session().post(f"{UPSTREAM}/chat/completions", data=request.get_data(),
                          headers={"Content-Type": "application/json"}, stream=True)
    return _relay(resp)


@app.get("/v1/models")
def models() -> Response:
    return _relay(session().get(f"{UPSTREAM}/models", stream=True))
