"""Structured logs end to end: gunicorn over HTTP, reading what the gateway wrote to stderr. One JSON access
line per request (logger "boundless.access"), with the key's name and prefix but never the key; the
gateway's own log lines (tracebacks included) are JSON on stderr too, and never reach the caller."""
from __future__ import annotations

import json
import logging
import time

import pytest
import requests

from support import PAID_IN
from support import PAID_OUT
from support import PROVIDER_KEY

MSG = [{"role": "user", "content": "hello there"}]

FIELDS = {"ts", "request_id", "method", "path", "status", "key_name", "key_prefix", "model", "stream",
          "upstream_status", "prompt_tokens", "completion_tokens", "charge", "estimated", "latency_ms",
          "ttfb_ms", "outcome"}


def chat(gw, key, model="free-model", mock=None, stream=False, body=None, **kw) -> requests.Response:
    payload = body if body is not None else {"model": model, "messages": MSG, **kw}
    if stream:
        payload["stream"] = True
    if mock:
        payload["mock"] = mock
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return requests.post(gw.base_url + "/chat/completions", data=data, headers=headers, timeout=30, stream=stream)


def json_lines(gw) -> list[dict]:
    out = []
    for line in gw.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def access_lines(gw, request_id: str, timeout: float = 10.0) -> list[dict]:
    """The access lines of one request, waiting for the first (a stream logs just after its last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        got = [o for o in json_lines(gw) if o.get("logger") == "boundless.access" and o.get("request_id") == request_id]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def the_line(gw, resp: requests.Response) -> dict:
    rid = resp.headers["X-Request-Id"]
    lines = access_lines(gw, rid)
    time.sleep(0.2)                              # a second line would have come by now
    lines = access_lines(gw, rid)
    assert len(lines) == 1, lines
    line = lines[0]
    assert FIELDS <= set(line), FIELDS - set(line)
    assert line["ts"].endswith("Z") and line["ts"][:2] == "20"
    return line


@pytest.fixture(scope="module")
def paid_key(gateway):
    name = "logs-paid-" + str(time.time_ns())
    return name, gateway.create_key(name=name, credit="5", rpm=1000, rpd=10000)


def test_chat_request_line(gateway, paid_key):
    name, key = paid_key
    usage = {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
    resp = chat(gateway, key, model="paid-model", mock={"usage": usage})
    assert resp.status_code == 200
    line = the_line(gateway, resp)
    assert line["key_name"] == name and line["key_prefix"] == key[:8]
    assert (line["method"], line["path"], line["status"], line["upstream_status"]) == (
        "POST", "/api/v1/chat/completions", 200, 200)
    assert (line["model"], line["stream"], line["outcome"], line["estimated"]) == ("paid-model", False, "complete",
                                                                                  False)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (10, 7)
    assert line["charge"] == str((10 * PAID_IN + 7 * PAID_OUT) / 1_000_000)        # "0.024"
    assert line["latency_ms"] > 0 and 0 < line["ttfb_ms"] <= line["latency_ms"]
    log = gateway.log()
    assert key not in log and key[8:] not in log and PROVIDER_KEY not in log


def test_stream_lines(gateway, paid_key):
    name, key = paid_key
    with chat(gateway, key, stream=True, mock={"chunks": 3}) as resp:
        assert resp.status_code == 200
        resp.raw.read()
    line = the_line(gateway, resp)
    assert (line["status"], line["stream"], line["outcome"], line["model"]) == (200, True, "complete", "free-model")
    assert line["completion_tokens"] == 3 and line["estimated"] is False and line["charge"] == "0"
    assert line["key_name"] == name

    # the provider cuts the stream after it started: the caller got a 200
    with chat(gateway, key, stream=True, mock={"cut_after": 2}) as resp:
        resp.raw.read()
    line = the_line(gateway, resp)
    assert (line["status"], line["upstream_status"], line["outcome"]) == (200, 200, "upstream_cut")
    # ... and the gateway's own warning about it is a JSON line on stderr too
    warnings = [o for o in json_lines(gateway) if o.get("logger") == "boundless" and o.get("level") == "warning"
                and "ended early" in o.get("message", "")]
    assert warnings

    # the caller hangs up: estimated usage from what was delivered
    resp = chat(gateway, key, model="paid-model", stream=True, mock={"chunks": 100, "gap": 0.05, "no_usage": True})
    rid = resp.headers["X-Request-Id"]
    it = resp.iter_content(64)
    next(it)
    resp.close()
    lines = access_lines(gateway, rid)
    assert len(lines) == 1 and lines[0]["outcome"] == "client_closed" and lines[0]["estimated"] is True
    assert lines[0]["status"] == 200 and float(lines[0]["charge"]) > 0


def test_refused_and_failed_requests_have_one_line_each(gateway, paid_key):
    _, key = paid_key
    broke = gateway.create_key()
    limited = gateway.create_key(rpm=1, rpd=100)
    cases = [
        (chat(gateway, None), 401, {}),
        (chat(gateway, key, model="no-such-model"), 404, {"model": None}),
        (chat(gateway, key, body={"model": "free-model"}), 400, {}),
        (chat(gateway, broke, model="paid-model"), 402, {"model": "paid-model", "refused": "credit"}),
        (chat(gateway, key, mock={"status": 503}), 502, {"upstream_status": 503, "outcome": "upstream_error"}),
        (chat(gateway, key, mock={"status": 400}), 400, {"upstream_status": 400, "outcome": "upstream_error"}),
    ]
    if 60 - time.time() % 60 < 5:                # both in one wall-clock minute window
        time.sleep(60 - time.time() % 60 + 0.1)
    assert chat(gateway, limited).status_code == 200
    cases.append((chat(gateway, limited), 429, {"refused": "minute", "model": "free-model"}))
    for resp, status, expect in cases:
        assert resp.status_code == status, resp.text
        line = the_line(gateway, resp)
        assert line["status"] == status
        for field, value in expect.items():
            assert line[field] == value, (field, line)
        if status in (400, 401, 402, 404, 429) and "upstream_status" not in expect:
            assert line["outcome"] is None and line["upstream_status"] is None and line["charge"] is None


def test_unexpected_error_goes_to_the_log_not_to_the_caller(tmp_path, mock, caplog):
    # In-process: the gateway has no route that fails on purpose, so the test adds one to a real app and
    # checks the one renderer of unexpected errors (app/errors.py) and the JSON formatter (app/server/logs.py).
    from app import create_app
    from app.server.logs import JsonFormatter
    from support import write_catalog
    app = create_app({"BOUNDLESS_CONFIG": str(write_catalog(tmp_path / "c.toml", mock.url)),
                      "BOUNDLESS_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}",
                      "BOUNDLESS_RATELIMIT_STORAGE": f"sqlite:///{tmp_path / 'rl.db'}"})

    @app.get("/boom")
    def boom():
        raise RuntimeError("internal detail 42")

    with caplog.at_level(logging.ERROR, logger="boundless"):
        resp = app.test_client().get("/boom")
    assert resp.status_code == 500
    assert resp.json == {"error": {"message": "The server had an error while processing your request.",
                                   "type": "api_error", "param": None, "code": "internal_error"}}
    assert "internal detail 42" not in resp.text and "Traceback" not in resp.text
    errors = [r for r in caplog.records if r.name == "boundless" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    line = json.loads(JsonFormatter().format(errors[0]))
    assert line["message"] == "unhandled error" and line["level"] == "error"
    assert "Traceback" in line["traceback"] and "internal detail 42" in line["traceback"]


def test_probes_and_unknown_paths_are_logged_too(gateway):
    for path, status in (("/healthz", 200), ("/readyz", 200), ("/no/such/path", 404)):
        marker = f"{path}?m={time.time_ns()}"
        assert requests.get(gateway.url + marker, timeout=10).status_code == status
    time.sleep(0.3)
    lines = [o for o in json_lines(gateway) if o.get("logger") == "boundless.access"]
    assert any(o["path"] == "/no/such/path" and o["status"] == 404 for o in lines)
    assert any(o["path"] == "/readyz" and o["status"] == 200 for o in lines)
    assert not any("?" in o["path"] for o in lines)          # the query string is not logged


def test_access_log_can_be_turned_off(gateway_factory):
    gw = gateway_factory(env={"BOUNDLESS_LOG_REQUESTS": "false"})
    key = gw.create_key()
    assert chat(gw, key).status_code == 200
    assert requests.get(gw.url + "/healthz", timeout=10).status_code == 200
    time.sleep(0.5)
    assert not [o for o in json_lines(gw) if o.get("logger") == "boundless.access"]
