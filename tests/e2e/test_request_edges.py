"""Request bodies at the edges of JSON and failures inside the gateway (issue 15, holes 1, 2 and 4), end to end.

The gateway runs under gunicorn against its own fake upstream (with recording off: a recorded lone surrogate
would break the mock's ``/_mock/requests`` for every later test), an echo server (to see the exact bytes a
provider gets) and a broken upstream (a ``Content-Length`` that is a digit only to Unicode). Every test checks
that no ledger row is left ``held`` and the ledger identity.
"""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid

import pytest
import requests

from app.accounting.billing import MAX_TOKENS
from app.jsonio import MAX_DEPTH
from app.store.models import ApiKey
from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from bench.mock_upstream import MockUpstream
from support import Gateway
from support import echo_server
from support import ledger_check

MSG = b'[{"role":"user","content":"hi"}]'


@contextlib.contextmanager
def raw_upstream(answer: bytes):
    """A provider on 127.0.0.1 that reads a request and answers ``answer`` verbatim, then closes."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536) or b"\r\n\r\n"
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.close()
        thread.join(5)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    bad = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \xb2\r\n"
           b"Connection: close\r\n\r\n{}")
    with MockUpstream(chunks=3, gap=0.0, record=False) as mock, echo_server() as echo_port, \
            raw_upstream(bad) as bad_port:
        extra = f"""
[providers.echo]
base_url = "http://127.0.0.1:{echo_port}/v1"

[models."echo-paid"]
provider = "echo"
input_price = 1000
output_price = 2000
max_output_tokens = 100

[providers.bad]
base_url = "http://127.0.0.1:{bad_port}/v1"

[models."bad-paid"]
provider = "bad"
input_price = 1000
output_price = 2000
max_output_tokens = 100
"""
        gateway = Gateway(tmp_path_factory.mktemp("edges"), mock.url, catalog_extra=extra)
        gateway.start()
        try:
            yield gateway
        finally:
            gateway.stop()


def new_key(gw: Gateway, credit: str = "10") -> tuple[str, str]:
    name = "k-" + uuid.uuid4().hex[:10]
    return name, gw.create_key(name, rpm=10_000, rpd=100_000, credit=credit)


def post(gw: Gateway, key: str, raw: bytes) -> requests.Response:
    with requests.Session() as s:
        s.trust_env = False
        return s.post(gw.base_url + "/chat/completions", data=raw, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def ledger(gw: Gateway, name: str) -> tuple[list[tuple], int]:
    """The key's ledger rows (state, outcome, charge, reserved) and its balance."""
    db.initialize(make_database(gw.database_url))
    try:
        with db.connection_context():
            found = [(u.state, u.outcome, u.charge, u.reserved) for u in
                     Usage.select().join(ApiKey).where(ApiKey.name == name).order_by(Usage.id)]
            return found, ApiKey.get(ApiKey.name == name).balance
    finally:
        db.close_all()


def assert_error(resp: requests.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    return error


# --------------------------------------------------------------------------------------------------
# 1. stream must be a JSON boolean
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [b"1", b"0", b"1.0", b'"true"', b"[]", b"{}", b'"false"'])
def test_stream_must_be_a_json_boolean(gw, value):
    """``"stream": 1`` used to pass validation (1 == True) and take the non-stream path, so the upstream
    streamed events that were billed as 0 completion tokens."""
    name, key = new_key(gw)
    resp = post(gw, key, b'{"model":"paid-model","stream":%b,"messages":%b}' % (value, MSG))
    error = assert_error(resp, 400, "stream")
    assert "boolean" in error["message"]
    assert ledger(gw, name) == ([], 10_000_000)          # refused before anything was reserved


def test_stream_true_false_and_null_are_accepted(gw):
    name, key = new_key(gw)
    for value in (b"true", b"false", b"null"):
        resp = post(gw, key, b'{"model":"paid-model","stream":%b,"messages":%b}' % (value, MSG))
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream" if value == b"true" else
                                                       "application/json")
    rows, _ = ledger(gw, name)
    assert [r[:2] for r in rows] == [("settled", "complete")] * 3 and all(r[2] > 0 for r in rows)
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# 2. lone surrogates, deep nesting, and any failure after the reservation
# --------------------------------------------------------------------------------------------------

def test_a_lone_surrogate_goes_to_the_provider_as_written(gw):
    """``"\\ud83d"`` is valid JSON that orjson refuses to write: it answered 500 and left the credit held."""
    name, key = new_key(gw)
    resp = post(gw, key, b'{"model":"paid-model","messages":[{"role":"user","content":"\\ud83d and \\udc00"}]}')
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    # the echo provider shows the exact body it got: the caller's escapes, as valid UTF-8 JSON
    resp = post(gw, key, b'{"model":"echo-paid","messages":[{"role":"user","content":"x\\ud83dy \xc3\xa9"}]}')
    assert resp.status_code == 200, resp.text
    sent = resp.json()["body"]
    assert "\\ud83d" in sent
    assert json.loads(sent)["messages"][0]["content"] == "x\ud83dy \u00e9"
    rows, _ = ledger(gw, name)
    assert [r[0] for r in rows] == ["settled", "settled"]
    ledger_check(gw.database_url)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 300, 1000, 5000])
def test_nesting_deeper_than_the_limit_is_400(gw, depth):
    name, key = new_key(gw)
    nested = b"[" * (depth - 1) + b"]" * (depth - 1)      # the body object is level 1
    resp = post(gw, key, b'{"model":"paid-model","messages":%b,"x":%b}' % (MSG, nested))
    error = assert_error(resp, 400)
    assert str(MAX_DEPTH) in error["message"]
    assert ledger(gw, name) == ([], 10_000_000)


def test_nesting_up_to_the_limit_passes_through(gw):
    name, key = new_key(gw)
    nested = b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
    resp = post(gw, key, b'{"model":"echo-paid","messages":%b,"x":%b}' % (MSG, nested))
    assert resp.status_code == 200, resp.text
    assert json.loads(resp.json()["body"])["x"] == json.loads(nested)
    rows, _ = ledger(gw, name)
    assert [r[0] for r in rows] == ["settled"]
    ledger_check(gw.database_url)


def test_a_failure_inside_the_gateway_settles_at_no_cost_and_answers_json(gw):
    """A provider whose ``Content-Length`` is ``²`` (a digit to ``str.isdigit``, not to ``int``) made the
    gateway raise a ValueError after the reservation: Flask's 500 and the credit held until a restart. Whatever
    raises there now, the request is settled at once at no cost and the caller gets an OpenAI-shaped error."""
    name, key = new_key(gw)
    resp = post(gw, key, b'{"model":"bad-paid","messages":%b}' % MSG)
    assert resp.status_code in (500, 502), resp.text
    error = assert_error(resp, resp.status_code)
    assert error["code"] in ("internal_error", "upstream_error")
    rows, balance = ledger(gw, name)
    assert [(state, charge) for state, _, charge, _ in rows] == [("settled", 0)]
    assert balance == 10_000_000
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# 4. max_tokens beyond the database's integer columns
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [MAX_TOKENS + 1, 2**63 - 1, 2**63, 10**20, 10**300],
                         ids=["2**31", "2**63-1", "2**63", "10**20", "10**300"])
def test_max_tokens_too_large_for_the_database_is_400(gw, field, value):
    name, key = new_key(gw)
    for model in ("paid-model", "free-model"):
        resp = post(gw, key, b'{"model":"%b","messages":%b,"%b":%d}' % (model.encode(), MSG, field.encode(), value))
        error = assert_error(resp, 400, field)
        assert str(MAX_TOKENS) in error["message"]
    assert ledger(gw, name) == ([], 10_000_000)


def test_the_largest_max_tokens_is_a_402_stating_what_the_balance_covers(gw):
    name, key = new_key(gw, credit="1")
    resp = post(gw, key, b'{"model":"paid-model","messages":%b,"max_tokens":%d}' % (MSG, MAX_TOKENS))
    error = assert_error(resp, 402, "max_tokens")
    fits = int(error["message"].split("max_tokens=")[1].split(";")[0])
    resp = post(gw, key, b'{"model":"paid-model","messages":%b,"max_tokens":%d}' % (MSG, fits))
    assert resp.status_code == 200, resp.text
    ledger_check(gw.database_url)
