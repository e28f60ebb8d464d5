"""Credit end to end: the gateway under gunicorn (4 workers) over HTTP, the fake upstream, the real database.

One gateway per database kind for the whole module (fresh keys per test). Tests marked ``ALL`` run on SQLite,
PostgreSQL and MariaDB; the others on SQLite only. Every test ends with :func:`support.ledger_check`: for every
key, entries - charges - held = balance, charges = spent, balance >= 0.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import threading
import time
import uuid
from decimal import Decimal

import openai
import pytest
import requests

from app.accounting.billing import prompt_upper_bound
from app.accounting.credits import to_credits
from app.store.models import ApiKey
from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from support import PAID_IN
from support import PAID_OUT
from support import Database
from support import Gateway
from support import ledger_check

KINDS = ["sqlite", "postgres", "mariadb"]
ALL = pytest.mark.parametrize("gw", KINDS, indirect=True)
SQLITE = pytest.mark.parametrize("gw", ["sqlite"], indirect=True)

ROW_FIELDS = ("request_id", "model", "state", "stream", "reserved", "charge", "prompt_tokens", "completion_tokens",
              "estimated", "status", "outcome", "latency_ms", "ttfb_ms", "created_at")


@pytest.fixture(scope="module")
def gw(request, tmp_path_factory, mock):
    """A 4-worker gateway on a fresh database of the kind given by the test's parametrization."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"billing-{kind}")
    database = Database(kind, tmp)
    # a long upstream read timeout, so a loaded machine never turns a slow test stream into a timeout
    gateway = Gateway(tmp, mock.url, database_url=database.url, workers=4,
                      ratelimit_storage=f"sqlite:///{tmp / 'ratelimit.db'}",
                      env={"BOUNDLESS_UPSTREAM_READ_TIMEOUT": "60"})
    try:
        # As `boundless serve` does: create the schema once before the workers start (4 workers racing to
        # create an empty PostgreSQL schema can crash one at boot; see the report).
        gateway.cli("db", "upgrade")
        gateway.start()
        yield gateway
    finally:
        gateway.stop()
        database.drop()


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def new_key(gw: Gateway, credit="0", rpm=10_000, rpd=100_000) -> tuple[str, str]:
    name = "k-" + uuid.uuid4().hex[:10]
    return name, gw.create_key(name, rpm=rpm, rpd=rpd, credit=credit)


@contextlib.contextmanager
def opened(gw: Gateway):
    db.initialize(make_database(gw.database_url))
    try:
        with db.connection_context():
            yield
    finally:
        db.close_all()


def key_state(gw: Gateway, name: str) -> tuple[int, int]:
    """(balance, spent) in micro-credits, straight from the database."""
    with opened(gw):
        row = ApiKey.get(ApiKey.name == name)
        return row.balance, row.spent


def rows(gw: Gateway, name: str) -> list[dict]:
    """The key's ledger rows, oldest first."""
    with opened(gw):
        query = (Usage.select().join(ApiKey).where(ApiKey.name == name).order_by(Usage.id))
        return [{f: getattr(r, f) for f in ROW_FIELDS} for r in query]


def wait_settled(gw: Gateway, name: str, count: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = rows(gw, name)
        if len(found) >= count and all(r["state"] == "settled" for r in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger rows not settled after {timeout}s: {found}")
        time.sleep(0.1)


def chat_body(content: str, **kw) -> bytes:
    """A compact request body (``worst_case`` gives what the gateway reserves for it)."""
    body = {"model": kw.pop("model", "paid-model"), "messages": [{"role": "user", "content": content}], **kw}
    return json.dumps(body, separators=(",", ":")).encode()


def mock_prompt_tokens(content: str) -> int:
    """The fake upstream's count: words + 4 per message."""
    return len(content.split()) + 4


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


def post(gw: Gateway, key: str, raw: bytes, stream: bool = False, http: requests.Session | None = None):
    return (http or session()).post(gw.base_url + "/chat/completions", data=raw, stream=stream, timeout=30,
                                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def sse_data(text: str) -> list[str]:
    """The data of each SSE event of a whole stream body."""
    out = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line[5:].strip() for line in event.split("\n") if line.startswith("data:")]
        if lines:
            out.append("\n".join(lines))
    return out


def price(prompt_tokens: int, completion_tokens: int) -> int:
    return prompt_tokens * PAID_IN + completion_tokens * PAID_OUT


def worst_case(raw: bytes, max_tokens: int) -> int:
    return prompt_upper_bound(json.loads(raw)) * PAID_IN + max_tokens * PAID_OUT


def credits(micro: int) -> str:
    return str(to_credits(micro))


# --------------------------------------------------------------------------------------------------
# 1. zero balance: 402 on a paid model, 200 on a free one, and the 402 changed nothing
# --------------------------------------------------------------------------------------------------

@SQLITE
def test_zero_balance_refused_on_paid_model_served_on_free(gw):
    name, key = new_key(gw, credit="0")
    client = gw.client(key)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="paid-model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5)
    err = info.value
    assert err.status_code == 402
    error = err.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "insufficient_quota"
    assert "balance is 0" in error["message"] and "paid-model" in error["message"]
    assert err.response.headers["X-Request-Id"].startswith("req_")
    assert rows(gw, name) == []                       # a 402 reserves nothing and records nothing
    assert key_state(gw, name) == (0, 0)

    resp = client.chat.completions.with_raw_response.create(
        model="free-model", messages=[{"role": "user", "content": "hi"}])
    completion = resp.parse()
    assert completion.choices[0].message.content
    [row] = rows(gw, name)                            # free use is recorded, at no cost
    assert (row["model"], row["state"], row["charge"], row["reserved"], row["estimated"], row["status"]) == (
        "free-model", "settled", 0, 0, False, 200)
    assert row["request_id"] == resp.headers["X-Request-Id"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert key_state(gw, name) == (0, 0)
    ledger_check(gw.database_url)


@SQLITE
def test_402_message_gives_a_max_tokens_that_is_then_admitted(gw):
    name, key = new_key(gw, credit="0.2")
    client = gw.client(key)
    messages = [{"role": "user", "content": "tell me something"}]
    for asked in ({"max_tokens": 100}, {}):               # with a limit, and without one (model max = 100)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="paid-model", messages=messages, **asked,
                                           extra_body={"mock": {"chunks": 1}})
        error = info.value.response.json()["error"]
        assert info.value.status_code == 402 and error["type"] == "insufficient_quota"
        assert f"balance is {credits(key_state(gw, name)[0])}." in error["message"]
        fits = int(error["message"].split("max_tokens=")[1].split(";")[0])
        assert 0 < fits < 100
        ok = client.chat.completions.create(model="paid-model", messages=messages, max_tokens=fits,
                                            extra_body={"mock": {"chunks": 1}})
        assert ok.usage.completion_tokens == 1
    ledger_check(gw.database_url)


@SQLITE
def test_a_balance_of_eight_real_costs_admits_a_short_request(gw):
    """Issue 15 (8): the worst case counted every byte of the JSON body as a prompt token, about ten times the
    real cost of a short English prompt, so a key holding several requests' worth was refused with 402."""
    content = "Write one short haiku about the quiet winter sea, please."
    raw = chat_body(content, max_tokens=1, mock={"chunks": 1})
    # what such a request really costs: run it once on a rich key
    rich_name, rich = new_key(gw, credit="10")
    assert post(gw, rich, raw).status_code == 200
    [row] = wait_settled(gw, rich_name, 1)
    real = row["charge"]
    assert real == price(mock_prompt_tokens(content), 1) and not row["estimated"]

    name, key = new_key(gw, credit=credits(8 * real))
    resp = post(gw, key, raw)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 1
    [row] = wait_settled(gw, name, 1)
    assert row["charge"] == real and row["reserved"] <= 8 * real
    # the bound still covers the real cost several times over
    assert row["reserved"] >= 2 * real
    assert key_state(gw, name) == (7 * real, real)
    ledger_check(gw.database_url)


@SQLITE
def test_bad_requests_reserve_and_charge_nothing(gw):
    name, key = new_key(gw, credit="1", rpd=1)      # the day's one request (a day window: no minute-edge flake)
    good = chat_body("hello")
    assert post(gw, key, b"{not json").status_code == 400
    assert post(gw, key, b'{"model":"paid-model","messages":[]}').status_code == 400
    assert post(gw, key, chat_body("x", stream="yes")).status_code == 400
    assert post(gw, key, chat_body("x", model="no-such-model")).status_code == 404
    assert post(gw, "sk-" + "x" * 43, good).status_code == 401
    assert post(gw, key, chat_body("hello", model="free-model")).status_code == 200    # the day's one request
    limited = post(gw, key, good)
    assert limited.status_code == 429
    assert [r["model"] for r in rows(gw, name)] == ["free-model"]
    assert key_state(gw, name) == (1_000_000, 0)

    name2, key2 = new_key(gw, credit="0.01")
    refused = post(gw, key2, chat_body("hello", max_tokens=1000))
    assert refused.status_code == 402 and refused.json()["error"]["type"] == "insufficient_quota"
    assert rows(gw, name2) == [] and key_state(gw, name2) == (10_000, 0)
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# 2. exact charges: usage x price, for JSON and for streams (usage chunk stripped unless asked)
# --------------------------------------------------------------------------------------------------

@ALL
def test_exact_charge_json(gw):
    name, key = new_key(gw, credit="5")
    client = gw.client(key)
    raw = client.chat.completions.with_raw_response.create(
        model="paid-model", messages=[{"role": "user", "content": "what is the price of this"}], max_tokens=40)
    completion = raw.parse()
    usage = completion.usage
    expected = price(usage.prompt_tokens, usage.completion_tokens)
    assert expected == (6 + 4) * 1000 + 5 * 2000
    assert key_state(gw, name) == (5_000_000 - expected, expected)
    [row] = rows(gw, name)
    assert row["request_id"] == raw.headers["X-Request-Id"]
    assert (row["state"], row["charge"], row["prompt_tokens"], row["completion_tokens"], row["estimated"],
            row["status"], row["stream"], row["outcome"]) == (
        "settled", expected, usage.prompt_tokens, usage.completion_tokens, False, 200, False, "complete")
    assert row["latency_ms"] is not None and row["latency_ms"] >= row["ttfb_ms"] >= 0
    ledger_check(gw.database_url)


@ALL
def test_exact_charge_streams(gw, mock):
    name, key = new_key(gw, credit="5")
    opening = 5_000_000

    # without include_usage: the gateway asks for usage anyway, charges it, and strips the usage-only chunk
    marker = uuid.uuid4().hex
    content = f"stream me please {marker}"
    resp = post(gw, key, chat_body(content, stream=True), stream=True)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    rid = resp.headers["X-Request-Id"]
    events = sse_data(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks), "the usage-only chunk must be stripped when not asked for"
    assert not any(c.get("usage") for c in chunks)
    content_chunks = sum(1 for c in chunks if c["choices"][0]["delta"].get("content"))
    assert content_chunks == 5
    upstream = mock.wait_for(lambda r: marker in json.dumps(r["body"]))
    assert upstream["body"]["stream_options"] == {"include_usage": True}
    expected1 = price(mock_prompt_tokens(content), content_chunks)
    [row] = wait_settled(gw, name, 1)
    assert row["request_id"] == rid
    assert (row["charge"], row["estimated"], row["stream"], row["status"], row["outcome"]) == (
        expected1, False, True, 200, "complete")
    assert key_state(gw, name) == (opening - expected1, expected1)

    # with include_usage: the caller gets the usage chunk unchanged, and that is what is charged
    client = gw.client(key)
    raw = client.chat.completions.with_raw_response.create(
        model="paid-model", messages=[{"role": "user", "content": "and again with usage"}], stream=True,
        stream_options={"include_usage": True})
    rid2 = raw.headers["X-Request-Id"]
    received = list(raw.parse())
    usage_chunks = [c for c in received if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    usage = usage_chunks[0].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (mock_prompt_tokens("and again with usage"), 5)
    expected2 = price(usage.prompt_tokens, usage.completion_tokens)
    row2 = wait_settled(gw, name, 2)[1]
    assert row2["request_id"] == rid2
    assert (row2["charge"], row2["prompt_tokens"], row2["completion_tokens"], row2["estimated"]) == (
        expected2, usage.prompt_tokens, usage.completion_tokens, False)
    assert key_state(gw, name) == (opening - expected1 - expected2, expected1 + expected2)
    ledger_check(gw.database_url)


@ALL
def test_a_stream_is_settled_before_its_done_reaches_the_caller(gw):
    """The OpenAI SDKs stop reading at [DONE] and the caller may ask for its balance at once: by then the
    stream's charge is in the ledger and nothing of it is held. (Settled after [DONE], a read right after it
    saw the reservation still held in several of 60 tries, on SQLite already.)"""
    name, key = new_key(gw, credit="5")
    opening = 5_000_000
    http, other = session(), session()
    auth = {"Authorization": f"Bearer {key}"}
    spent = 0
    for i in range(40):
        raw = chat_body(f"settled before done {i}", stream=True, max_tokens=20,
                        stream_options={"include_usage": True})
        with post(gw, key, raw, stream=True, http=http) as resp:
            assert resp.status_code == 200
            got = b""
            for part in resp.iter_content(None):        # as an SDK reads: until [DONE], not to the end
                got += part
                if b"data: [DONE]" in got:
                    break
            info = other.get(gw.base_url + "/key", headers=auth, timeout=10).json()["data"]
        usage = [json.loads(e)["usage"] for e in sse_data(got.decode()) if e != "[DONE]" and json.loads(e).get("usage")]
        assert len(usage) == 1
        spent += price(usage[0]["prompt_tokens"], usage[0]["completion_tokens"])
        assert (Decimal(info["balance"]), Decimal(info["spent"])) == (
            to_credits(opening - spent), to_credits(spent)), f"stream {i}: the charge was not settled at [DONE]"
    http.close()
    other.close()
    assert all(r["state"] == "settled" and r["outcome"] == "complete" for r in wait_settled(gw, name, 40))
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# 3. concurrency: 40 requests at once on a balance that covers 5 worst cases
# --------------------------------------------------------------------------------------------------

@ALL
def test_concurrent_requests_never_overdraw(gw, mock):
    """40 streams at once on a balance of 5.5 worst cases: exactly 5 admitted, 35 refused, never overdrawn.

    The admitted streams are slow (45 chunks, 0.4 s apart: up to 18 s) and their callers hold them open until
    every status is in, so no reservation is given back during the burst however slowly a loaded machine
    serves it. While they are held, 10 concurrent JSON requests are all refused too. Then the callers hang up
    and each is charged its estimate (fewer tokens than max_tokens, so within its reservation).
    """
    n = 40
    marker = uuid.uuid4().hex[:12]
    content = f"count to five {marker}"
    raw = chat_body(content, max_tokens=50, stream=True, mock={"chunks": 45, "gap": 0.4})
    worst = worst_case(raw, 50)
    opening = 5 * worst + worst // 2
    json_raw = chat_body(content, max_tokens=50)
    assert worst_case(json_raw, 50) > opening - 5 * worst
    name, key = new_key(gw, credit=credits(opening))

    barrier = threading.Barrier(n)
    lock = threading.Lock()
    all_in, release = threading.Event(), threading.Event()
    results: list[tuple[int, object]] = []

    def one() -> None:
        http = session()
        try:
            barrier.wait(30)
            resp = post(gw, key, raw, stream=True, http=http)
            detail: object = None
            if resp.status_code == 200:
                buf = b""
                while b'"content":"tok' not in buf and (data := resp.raw.read1(65536)):
                    buf += data
                detail = buf
            else:
                detail = resp.json()
            with lock:
                results.append((resp.status_code, detail))
                if len(results) == n:
                    all_in.set()
            if resp.status_code == 200:
                release.wait(60)
            resp.close()
        finally:
            http.close()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        assert all_in.wait(60), f"only {len(results)} answers"
        statuses = [status for status, _ in results]
        ok = statuses.count(200)
        assert ok == 5 and statuses.count(402) == n - 5, statuses
        for status, detail in results:
            if status == 402:
                assert detail["error"]["type"] == "insufficient_quota"
                assert f"balance is {credits(opening - 5 * worst)}" in detail["error"]["message"]
            else:
                assert b'"content":"tok0"' in detail
        assert key_state(gw, name) == (opening - 5 * worst, 0)        # 5 worst cases held, nothing more

        more = []
        json_barrier = threading.Barrier(10)

        def json_one() -> None:
            http = session()
            json_barrier.wait(30)
            more.append(post(gw, key, json_raw, http=http).status_code)
            http.close()

        json_threads = [threading.Thread(target=json_one) for _ in range(10)]
        for t in json_threads:
            t.start()
        for t in json_threads:
            t.join(60)
        assert more == [402] * 10
    finally:
        release.set()
        for t in threads:
            t.join(60)

    settled = wait_settled(gw, name, 5)
    assert len(settled) == 5                          # one ledger row per admitted request, none for a 402
    for row in settled:
        assert (row["estimated"], row["outcome"], row["status"]) == (True, "client_closed", 200)
        assert row["completion_tokens"] >= 1
        assert row["charge"] == price(math.ceil(len(raw) / 4), row["completion_tokens"]) > 0
    charges = sum(r["charge"] for r in settled)
    balance, spent = key_state(gw, name)
    assert balance == opening - charges >= 0 and spent == charges
    records = [r for r in mock.requests() if marker in json.dumps(r["body"])]
    assert len(records) == 5                          # refused requests never reached the upstream
    assert mock.wait_for(lambda r: marker in json.dumps(r["body"]) and not r["client_closed"], timeout=0) is None
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# 4. the caller hangs up mid-stream: estimated charge, upstream closed
# --------------------------------------------------------------------------------------------------

@ALL
def test_caller_hangs_up_mid_stream(gw, mock):
    name, key = new_key(gw, credit="5")
    marker = uuid.uuid4().hex
    raw = chat_body(f"a long story {marker}", stream=True, mock={"chunks": 50, "gap": 0.1})
    http = session()
    resp = post(gw, key, raw, stream=True, http=http)
    assert resp.status_code == 200
    rid = resp.headers["X-Request-Id"]
    buf, seen = b"", 0
    while seen < 3:
        data = resp.raw.read1(65536)
        assert data, "stream ended early"
        buf += data
        seen = buf.count(b'"content":"') - buf.count(b'"content":""')
    resp.close()
    http.close()

    record = mock.wait_for(lambda r: marker in json.dumps(r["body"]) and r["client_closed"], timeout=10)
    assert record is not None, "the gateway did not close the upstream connection"
    assert record["chunks_sent"] < 50 and not record["completed"]
    [row] = wait_settled(gw, name, 1)
    assert row["request_id"] == rid
    assert row["estimated"] is True and row["outcome"] == "client_closed"
    assert seen <= row["completion_tokens"] < 50
    assert row["prompt_tokens"] == math.ceil(len(raw) / 4)
    assert row["charge"] == price(row["prompt_tokens"], row["completion_tokens"]) > 0
    assert key_state(gw, name) == (5_000_000 - row["charge"], row["charge"])
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# 5. upstream failures: a cut stream (SSE error event, estimate) and a 5xx before anything (free)
# --------------------------------------------------------------------------------------------------

@ALL
def test_upstream_cut_mid_stream(gw):
    name, key = new_key(gw, credit="5")
    raw = chat_body("cut me off", stream=True, mock={"chunks": 10, "cut_after": 3})
    resp = post(gw, key, raw, stream=True)
    assert resp.status_code == 200
    events = sse_data(resp.text)
    last = json.loads(events[-1])
    assert set(last) == {"error"} and set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["type"] == "upstream_error"
    delivered = sum(1 for e in events[:-1] if json.loads(e)["choices"][0]["delta"].get("content"))
    assert delivered == 3
    [row] = wait_settled(gw, name, 1)
    assert row["request_id"] == resp.headers["X-Request-Id"]
    assert (row["estimated"], row["outcome"], row["status"], row["completion_tokens"]) == (
        True, "upstream_cut", 200, 3)
    assert row["charge"] == price(math.ceil(len(raw) / 4), 3)
    assert key_state(gw, name) == (5_000_000 - row["charge"], row["charge"])
    ledger_check(gw.database_url)


@SQLITE
def test_upstream_error_before_anything_costs_nothing(gw):
    name, key = new_key(gw, credit="5")
    client = gw.client(key)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="paid-model", messages=[{"role": "user", "content": "fail"}],
                                       extra_body={"mock": {"status": 503}})
    assert info.value.status_code == 502
    assert info.value.response.json()["error"]["type"] == "upstream_error"
    rid_json = info.value.response.headers["X-Request-Id"]

    stream = post(gw, key, chat_body("fail", stream=True, mock={"status": 503}), stream=True)
    assert stream.status_code == 502 and stream.json()["error"]["type"] == "upstream_error"

    cut = post(gw, key, chat_body("half a body", mock={"cut_after": 1}))     # non-stream: half a body, then cut
    assert cut.status_code == 502

    first, second, third = wait_settled(gw, name, 3)
    assert first["request_id"] == rid_json
    for row in (first, second):
        assert (row["status"], row["charge"], row["estimated"], row["outcome"]) == (503, 0, False, "upstream_error")
    assert (third["status"], third["charge"], third["outcome"]) == (200, 0, "upstream_cut")
    assert key_state(gw, name) == (5_000_000, 0)
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# 6. a top-up restores service; setting the balance takes it away again (no restart)
# --------------------------------------------------------------------------------------------------

@SQLITE
def test_topup_restores_service(gw):
    name, key = new_key(gw, credit="0")
    body = chat_body("are we there yet", max_tokens=10)
    refused = post(gw, key, body)
    assert refused.status_code == 402
    out = gw.cli("keys", "topup", name, "0.5").stdout
    assert "0.5" in out
    served = post(gw, key, body)
    assert served.status_code == 200
    charge = price(served.json()["usage"]["prompt_tokens"], served.json()["usage"]["completion_tokens"])
    assert key_state(gw, name) == (500_000 - charge, charge)
    gw.cli("keys", "update", name, "--credit", "0")
    assert post(gw, key, body).status_code == 402
    assert key_state(gw, name) == (0, charge)
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# 7. GET /api/v1/key: documented fields, exact numbers, not rate-counted
# --------------------------------------------------------------------------------------------------

@ALL
def test_key_endpoint_exact_and_not_counted(gw):
    name, key = new_key(gw, credit="1.234567", rpm=5, rpd=7)
    second = datetime.datetime.now(datetime.timezone.utc).second
    if second >= 50:                                  # keep the minute window from rolling over mid-test
        time.sleep(61 - second)
    http = session()
    auth = {"Authorization": f"Bearer {key}"}

    def info() -> dict:
        resp = http.get(gw.base_url + "/key", headers=auth, timeout=10)
        assert resp.status_code == 200 and resp.headers["X-Request-Id"].startswith("req_")
        body = resp.json()
        assert set(body) == {"data"}
        assert set(body["data"]) == {"name", "balance", "spent", "rpm", "rpd", "remaining_rpm", "remaining_rpd",
                                     "budget", "budget_period", "budget_spent", "budget_resets_at",   # per-key
                                     "models", "expires_at", "max_parallel"}                        # policy
        return body["data"]

    first = info()
    assert first == {"name": name, "balance": "1.234567", "spent": "0", "rpm": 5, "rpd": 7,
                     "remaining_rpm": 5, "remaining_rpd": 7, "budget": None, "budget_period": None,
                     "budget_spent": None, "budget_resets_at": None, "models": ["*"], "expires_at": None,
                     "max_parallel": None}
    assert info() == first                            # reading is not a request against the limits

    resp = post(gw, key, chat_body("what do I have left", max_tokens=20), http=http)
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    charge = price(usage["prompt_tokens"], usage["completion_tokens"])
    [row] = rows(gw, name)
    assert row["request_id"] == resp.headers["X-Request-Id"] and row["charge"] == charge

    after = info()
    assert Decimal(after["balance"]) == to_credits(1_234_567 - charge)
    assert Decimal(after["spent"]) == to_credits(charge)
    assert isinstance(after["balance"], str) and isinstance(after["spent"], str)     # decimal strings (issue 18)
    assert (after["remaining_rpm"], after["remaining_rpd"]) == (4, 6)
    assert info() == after
    http.close()
    assert requests.get(gw.base_url + "/key", headers={"Authorization": "Bearer sk-nope"}, timeout=10
                        ).status_code == 401
    ledger_check(gw.database_url)
