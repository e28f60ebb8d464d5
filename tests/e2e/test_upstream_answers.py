"""Upstream answers that are not what the request asked for, through the gateway under gunicorn: each is a 502 that
says what was wrong (never a 500), charged nothing; a stream that ends without ``[DONE]`` is a cut; a provider's
own 4xx passes through as JSON."""
from __future__ import annotations

import gzip
import json
import time
import uuid
from decimal import Decimal

import openai
import pytest
import requests

from app.store.models import ApiKey
from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from scripted import COMPLETION
from scripted import Script
from scripted import chunk
from scripted import json_answer
from support import Gateway
from support import ledger_check

CAP = 4096
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
EVENTS = [b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n'
          % i for i in range(2)]
USAGE = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
         b'"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n')
ERROR_400 = {"message": "bad temperature", "type": "invalid_request_error", "param": "temperature", "code": None}

#: What the provider answers, by the request's message.
ANSWERS = {
    "ok": [json_answer(COMPLETION)],
    "html": [json_answer(b"<html><body>Welcome to nginx!</body></html>", content_type=b"text/html")],
    "101": [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "close"],
    "204": [b"HTTP/1.1 204 No Content\r\n\r\n"],
    "big": [json_answer(COMPLETION[:-1] + b',"pad":"' + b"x" * CAP + b'"}')],
    "big-chunked": [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunk(COMPLETION[:-1] + b',"pad":"') + chunk(b"x" * CAP) + chunk(b'"}') + b"0\r\n\r\n"],
    "gzip-bomb": [json_answer(gzip.compress(COMPLETION[:-1] + b',"pad":"' + b" " * (50 * CAP) + b'"}'),
                              extra=b"Content-Encoding: gzip\r\n")],
    "bare-cr": [json_answer(COMPLETION, extra=b"X-Note: a\rX-Injected: 1\r\n")],
    "bad-length": [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \xc2\xb2\r\n\r\n"
                   + COMPLETION, "close"],
    "bad-chunk": [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"zz\r\n" + COMPLETION + b"\r\n0\r\n\r\n", "close"],
    "error-400": [json_answer(json.dumps({"error": ERROR_400}).encode(), status=b"400 Bad Request")],
    "stream-html": [json_answer(b"<html>maintenance</html>", content_type=b"text/html")],
    "stream-close-cut": [SSE_HEAD + b"Connection: close\r\n\r\n" + EVENTS[0], 0.05, EVENTS[1], "close"],
    "stream-chunked-no-done": [SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(EVENTS[0]) + chunk(EVENTS[1])
                               + chunk(USAGE) + b"0\r\n\r\n"],
    "stream-ok": [SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(EVENTS[0]) + chunk(EVENTS[1])
                  + chunk(USAGE) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"],
}


def _choose(request: bytes) -> list:
    body = json.loads(request.partition(b"\r\n\r\n")[2])
    return ANSWERS[body["messages"][0]["content"]]


@pytest.fixture(scope="module")
def gw(tmp_path_factory, mock):
    with Script(_choose) as script:
        gateway = Gateway(tmp_path_factory.mktemp("gw"), script.url,
                          env={"BOUNDLESS_UPSTREAM_MAX_BODY_BYTES": str(CAP)}).start()
        yield gateway
        gateway.stop()


def _post(gw, key, scenario: str, stream: bool = False):
    body = {"model": "paid-model", "messages": [{"role": "user", "content": scenario}], "max_tokens": 10}
    if stream:
        body["stream"] = True
    return requests.post(gw.base_url + "/chat/completions", json=body, timeout=30, stream=stream,
                         headers={"Authorization": f"Bearer {key}"})


def _key_state(gw, key) -> dict:
    return requests.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["data"]


def test_the_scripted_provider_answers_a_good_request(gw):
    """The control: the same server and gateway serve a well-formed answer, and charge for it."""
    key = gw.create_key(credit="1")
    resp = _post(gw, key, "ok")
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "hi"
    assert resp.headers["Content-Type"] == "application/json"
    assert Decimal(_key_state(gw, key)["spent"]) > 0
    ledger_check(gw.database_url)


@pytest.mark.parametrize(("scenario", "says"), [
    ("html", "'text/html' that is not a JSON object"),
    ("101", "HTTP 101 where a chat completion was expected"),
    ("204", "HTTP 204 where a chat completion was expected"),
    ("big", f"larger than the gateway accepts ({CAP} bytes)"),
    ("big-chunked", f"larger than the gateway accepts ({CAP} bytes)"),
    ("gzip-bomb", f"larger than the gateway accepts ({CAP} bytes)"),
    ("bare-cr", "broke the HTTP protocol"),
    ("bad-length", "invalid Content-Length"),
    ("bad-chunk", "broke off its answer"),
    ("stream-html", "'text/html' where an event stream was expected"),
])
def test_an_answer_that_is_not_what_was_asked_is_a_502_charged_nothing(gw, scenario, says):
    key = gw.create_key(credit="1")
    before = _key_state(gw, key)
    resp = _post(gw, key, scenario, stream=scenario.startswith("stream"))
    assert resp.status_code == 502, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["code"] == "upstream_error" and says in err["message"], err
    assert "127.0.0.1" not in err["message"]
    after = _key_state(gw, key)
    assert (after["balance"], after["spent"]) == (before["balance"], "0")
    ledger_check(gw.database_url)


def test_the_sdk_sees_a_bad_answer_as_a_server_error(gw):
    key = gw.create_key(credit="1")
    with pytest.raises(openai.InternalServerError) as info:
        gw.client(key).chat.completions.create(model="paid-model", messages=[{"role": "user", "content": "html"}])
    assert info.value.status_code == 502


def test_a_providers_own_4xx_passes_through_as_json(gw):
    key = gw.create_key(credit="1")
    resp = _post(gw, key, "error-400")
    assert resp.status_code == 400 and resp.json() == {"error": ERROR_400}
    assert resp.headers["Content-Type"] == "application/json"
    with pytest.raises(openai.BadRequestError) as info:
        gw.client(key).chat.completions.create(model="paid-model", messages=[{"role": "user", "content": "error-400"}])
    assert info.value.body == ERROR_400
    assert _key_state(gw, key)["spent"] == "0"


def _outcomes(gw, name: str, count: int) -> list[tuple[str, int]]:
    """(outcome, charge) of the key's ledger rows once ``count`` of them are settled, straight from the database."""
    db.initialize(make_database(gw.database_url))
    try:
        for _ in range(150):
            with db.connection_context():
                found = [(r.outcome, r.charge, r.state) for r in
                         Usage.select().join(ApiKey).where(ApiKey.name == name).order_by(Usage.id)]
            if len(found) >= count and all(state == "settled" for *_, state in found):
                return [(outcome, charge) for outcome, charge, _ in found]
            time.sleep(0.1)
        raise AssertionError(f"not settled: {found}")
    finally:
        db.close()


def _events(resp) -> list[str]:
    return [e[6:] for e in resp.text.split("\n\n") if e.startswith("data: ")]


@pytest.mark.parametrize("scenario", ["stream-close-cut", "stream-chunked-no-done"])
def test_a_stream_that_ends_without_done_is_a_cut(gw, scenario):
    """Whatever the framing (closed connection, or a proper last chunk), no [DONE] means the answer is not whole:
    one SSE error event, no made-up [DONE], and the ledger says upstream_cut."""
    name = "k-" + uuid.uuid4().hex[:8]
    key = gw.create_key(name, credit="1")
    resp = _post(gw, key, scenario, stream=True)
    assert resp.status_code == 200
    events = _events(resp)
    assert "[DONE]" not in events
    errors = [json.loads(e)["error"] for e in events if '"error"' in e]
    assert len(errors) == 1 and errors[0]["code"] == "upstream_error", events
    assert json.loads(events[-1]) == {"error": errors[0]}
    assert sum('"content":"t' in e for e in events) == 2
    with pytest.raises(openai.APIError):
        for _ in gw.client(key).chat.completions.create(
                model="paid-model", messages=[{"role": "user", "content": scenario}], stream=True):
            pass
    assert [outcome for outcome, _ in _outcomes(gw, name, 2)] == ["upstream_cut", "upstream_cut"]
    ledger_check(gw.database_url)


def test_a_whole_stream_still_ends_with_the_providers_done(gw):
    key = gw.create_key(credit="1")
    resp = _post(gw, key, "stream-ok", stream=True)
    events = _events(resp)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1 and not any('"error"' in e for e in events)


def test_a_close_delimited_stream_cut_by_the_mock_is_a_cut(gateway, key):
    """The issue's case on the shipped fake upstream: close-delimited framing, cut after two chunks."""
    body = {"model": "free-model", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "mock": {"close_delimited": True, "chunks": 5, "cut_after": 2}}
    resp = requests.post(gateway.base_url + "/chat/completions", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})
    events = _events(resp)
    assert "[DONE]" not in events
    assert len([e for e in events if '"error"' in e]) == 1 and '"error"' in events[-1]
