"""Unit tests of the money arithmetic (app/accounting/credits.py) and of billing (app/accounting/billing.py) straight on the DB layer.

No gateway here: the reservation/settlement functions are called directly on a real database (an SQLite
file; the concurrency test also runs on PostgreSQL and MariaDB), in threads and in forked processes.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import threading
from decimal import Decimal

import pytest
from peewee import fn

from app.accounting import billing
from app import keys
from app.store import schema
from app.accounting.billing import Lease
from app.accounting.billing import Outcome
from app.catalog import Model
from app.catalog import Provider
from app.accounting.credits import amount
from app.accounting.credits import cost
from app.accounting.credits import to_credits
from app.accounting.credits import to_micro
from app.errors import ConfigurationError
from app.errors import InsufficientCredits
from app.store.models import ApiKey
from app.store.models import CreditEntry
from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from support import PAID_IN
from support import PAID_OUT
from support import Database
from support import ledger_check

PROVIDER = Provider(name="mock", base_url="http://127.0.0.1:9/v1", api_key_env=None)
PAID = Model(id="paid-model", provider=PROVIDER, upstream_model="mock-paid", owned_by="mock",
             input_price=Decimal(PAID_IN), output_price=Decimal(PAID_OUT), max_output_tokens=100)
FREE = Model(id="free-model", provider=PROVIDER, upstream_model="mock-model", owned_by="mock")
CHEAP = Model(id="cheap", provider=PROVIDER, upstream_model="cheap", owned_by="mock",
              input_price=Decimal("0.15"), output_price=Decimal("0.6"), max_output_tokens=1000)


# --------------------------------------------------------------------------------------------------
# credits: to_micro / to_credits / amount / cost
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("amount, micro", [
    ("1", 1_000_000), ("0", 0), ("12.5", 12_500_000), ("0.000001", 1), ("1e-6", 1), ("3.141592", 3_141_592),
    (Decimal("2.25"), 2_250_000), (7, 7_000_000), ("-2", -2_000_000), ("123456789.123456", 123_456_789_123_456),
])
def test_to_micro_exact(amount, micro):
    assert to_micro(amount) == micro
    assert isinstance(to_micro(amount), int)


@pytest.mark.parametrize("amount", ["0.0000001", "1.1234567", "0.00000015", "1e-7"])
def test_to_micro_refuses_seven_decimals(amount):
    with pytest.raises(ConfigurationError, match="more than 6 decimals"):
        to_micro(amount)


@pytest.mark.parametrize("amount", ["1e30", "9007199254.740992", "-9007199254.740992", "1e13"])
def test_to_micro_refuses_amounts_a_balance_cannot_hold(amount):
    with pytest.raises(ConfigurationError, match="too large"):
        to_micro(amount)
    assert to_micro("9007199254.740991") == 2**53 - 1     # the largest: still exact as a JSON number


@pytest.mark.parametrize("amount", ["abc", "", "NaN", "inf", "-Infinity", "1,5", "0x10"])
def test_to_micro_refuses_non_amounts(amount):
    with pytest.raises(ConfigurationError, match="not an amount"):
        to_micro(amount)


def test_to_credits_and_amount():
    assert to_credits(1) == Decimal("0.000001")
    assert str(to_credits(1_500_000)) == "1.5"
    assert str(to_credits(984_000)) == "0.984"
    # amounts in JSON: decimal strings, never an exponent (issue 18: "0.000059", never 5.9e-05)
    assert [amount(m) for m in (0, 1, 59, 1_500_000, 5_000_000, 100_000_000, -2_500)] == [
        "0", "0.000001", "0.000059", "1.5", "5", "100", "-0.0025"]
    assert json.dumps(amount(1)) == '"0.000001"'
    for micro in (1, 7, 984_000, 123_456_789, 999_999_999_999, 2**53 - 1, 10**15 + 1):
        text = amount(micro)
        assert "e" not in text.lower() and Decimal(text) == to_credits(micro), micro


def test_cost_is_exact_and_rounds_up_once():
    # one token at price P (per 1M tokens) costs exactly P micro-credits
    assert cost(6, 5, Decimal(PAID_IN), Decimal(PAID_OUT)) == 6 * 1000 + 5 * 2000
    assert cost(0, 0, Decimal(PAID_IN), Decimal(PAID_OUT)) == 0
    assert cost(1, 0, Decimal("0.5"), Decimal(0)) == 1          # 0.5 micro-credit -> 1
    assert cost(3, 0, Decimal("0.1"), Decimal(0)) == 1          # 0.3 -> 1
    assert cost(10, 0, Decimal("0.1"), Decimal(0)) == 1         # exactly 1: no spurious rounding (0.1 is not a float)
    assert cost(11, 0, Decimal("0.1"), Decimal(0)) == 2
    assert cost(1, 1, Decimal("0.15"), Decimal("0.6")) == 1     # 0.75 -> 1: rounded once per request, not per side
    assert cost(7, 3, Decimal("0.15"), Decimal("0.6")) == 3     # 1.05 + 1.8 = 2.85 -> 3
    assert cost(10**9, 10**9, Decimal("0.000001"), Decimal("0.000003")) == 4000
    assert cost(10**12, 0, Decimal("1000"), Decimal(0)) == 10**15
    assert cost(5, 5, Decimal(0), Decimal(0)) == 0              # free


# --------------------------------------------------------------------------------------------------
# billing: worst case, charge
# --------------------------------------------------------------------------------------------------

BASE = billing.REQUEST_TOKENS + billing.MESSAGE_TOKENS        # a one-message request's fixed overhead


def _user(content) -> dict:
    return {"model": "paid-model", "messages": [{"role": "user", "content": content}]}


def test_prompt_upper_bound_counts_the_text_not_the_json_around_it():
    assert billing.prompt_upper_bound(_user("héllo world")) == BASE + len("user") + len("héllo world".encode())
    # quotes, backslashes and \u escapes are JSON syntax, not prompt text: the string counts its own bytes
    quoted = 'say "hi" \\ to 日本'
    assert billing.prompt_upper_bound(_user(quoted)) == BASE + 4 + len(quoted.encode())
    assert len(json.dumps(_user(quoted)).encode()) > billing.prompt_upper_bound(_user(quoted)) - BASE
    two = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert billing.prompt_upper_bound(two) == billing.REQUEST_TOKENS + 2 * billing.MESSAGE_TOKENS + 6 + 8 + 4 + 2
    # numbers and booleans at the top level are settings, never prompt text
    settings = {**_user("hi"), "max_tokens": 10**6, "temperature": 0.5, "stream": True, "n": 3, "seed": 7}
    assert billing.prompt_upper_bound(settings) == billing.prompt_upper_bound(_user("hi"))
    # a lone surrogate (valid JSON) counts its 3 bytes instead of failing
    assert billing.prompt_upper_bound(_user("\ud83d")) == BASE + 4 + 3


def test_prompt_upper_bound_images_tools_and_tool_calls():
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
             {"type": "image_url", "image_url": {"url": "http://x/b.png", "detail": "high"}}]
    strings = sum(len(s) for s in ("text", "what is this?", "image_url", "http://x/a.png", "image_url",
                                   "http://x/b.png", "high"))
    assert billing.prompt_upper_bound(_user(parts)) == BASE + 4 + strings + 2 * billing.IMAGE_TOKENS
    # a text that mentions image_url is no image
    assert billing.prompt_upper_bound(_user('say "image_url": please')) == BASE + 4 + 23

    # tool definitions may be rendered into the prompt as JSON (with spaces): they count as that
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    with_tools = {**_user("hi"), "tools": tools, "tool_choice": "auto"}
    assert billing.prompt_upper_bound(with_tools) == (
        billing.prompt_upper_bound(_user("hi")) + len(json.dumps(tools)) + len("auto"))

    # a tool call counts as its JSON, so arguments rendered with escaped quotes stay within the bound
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assistant = {"messages": [{"role": "assistant", "content": None, "tool_calls": calls},
                              {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}
    assert billing.prompt_upper_bound(assistant) == (
        billing.REQUEST_TOKENS + 2 * billing.MESSAGE_TOKENS + len("assistant") + len(json.dumps(calls))
        + len("tool") + len("call_1") + len("sunny"))


def test_prompt_upper_bound_is_several_times_tighter_than_the_body_size():
    """The issue's case: a short English prompt reserved ten times its real cost when every body byte counted."""
    body = _user("Write one short haiku about the quiet winter sea, please.")
    raw = json.dumps(body).encode()
    bound = billing.prompt_upper_bound(body)
    words = len(body["messages"][0]["content"].split())
    assert bound < len(raw)
    # still above any tokenizer: at least one byte of text per token, plus the template's overhead
    assert bound >= len(body["messages"][0]["content"].encode()) + billing.MESSAGE_TOKENS + billing.REQUEST_TOKENS
    assert bound < 8 * (words + 4)           # under 8 times the mock's count (1 per word + 4 per message)


@pytest.mark.parametrize("body, expected", [
    ({}, 100),
    ({"max_tokens": 7}, 7),
    ({"max_completion_tokens": 9}, 9),
    ({"max_completion_tokens": 9, "max_tokens": 50}, 9),       # the newer name wins
    ({"max_completion_tokens": None, "max_tokens": 50}, 50),
    ({"max_tokens": 0}, 100),
    ({"max_tokens": -5}, 100),
    ({"max_tokens": True}, 100),                                # a bool is not a count
    ({"max_tokens": "20"}, 100),
    ({"max_tokens": 20.0}, 100),
    ({"max_tokens": 5000}, 5000),                               # larger than the model's max: still the worst case
])
def test_max_completion_tokens(body, expected):
    assert billing.max_completion_tokens(body, PAID) == expected


def _lease(model=PAID, prompt_bytes=100, reserved=0, stream=True):
    return Lease(request_id=billing.new_request_id(), key_id=1, model=model, stream=stream,
                 prompt_bytes=prompt_bytes, reserved=reserved)


def test_charge_for_usage():
    out = Outcome(status=200, usage={"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
                  produced=True, delivered_events=2)
    assert billing.charge_for(_lease(), out) == (12 * 1000 + 34 * 2000, 12, 34, False)
    # usage wins over the delivered count even when the caller saw less
    assert billing.charge_for(_lease(model=CHEAP), out) == (math.ceil(12 * 0.15 + 34 * 0.6), 12, 34, False)
    # free models: tokens recorded, nothing charged
    assert billing.charge_for(_lease(model=FREE), out) == (0, 12, 34, False)


@pytest.mark.parametrize("usage, pt, ct", [
    ({"prompt_tokens": 3}, 3, 0),
    ({"prompt_tokens": -3, "completion_tokens": 4}, 0, 4),
    ({"prompt_tokens": True, "completion_tokens": "4"}, 0, 0),
    ({"prompt_tokens": 2.5, "completion_tokens": None}, 0, 0),
])
def test_charge_for_odd_usage(usage, pt, ct):
    assert billing.charge_for(_lease(), Outcome(usage=usage, produced=True)) == (pt * 1000 + ct * 2000, pt, ct, False)


def test_charge_for_no_answer_costs_nothing():
    assert billing.charge_for(_lease(), Outcome(status=None, produced=False)) == (0, 0, 0, False)
    assert billing.charge_for(_lease(), Outcome(status=503, produced=False)) == (0, 0, 0, False)


def test_charge_for_estimate_when_stream_ends_without_usage():
    lease = _lease(prompt_bytes=101)
    out = Outcome(status=200, produced=True, delivered_events=7, outcome="client_closed")
    pt = math.ceil(101 / 4)
    assert billing.charge_for(lease, out) == (pt * 1000 + 7 * 2000, pt, 7, True)
    # something was produced but nothing delivered: the prompt is still charged
    assert billing.charge_for(lease, Outcome(produced=True))[0] == pt * 1000


# --------------------------------------------------------------------------------------------------
# billing on a database
# --------------------------------------------------------------------------------------------------

def _init(url: str) -> None:
    db.initialize(make_database(url))
    with db.connection_context():
        schema.create()


@pytest.fixture
def sqlite_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    _init(url)
    yield url
    db.close_all()


def _new_key(name: str, credit: str) -> int:
    keys.create(name, credit=credit)
    return ApiKey.get(ApiKey.name == name).id


def _balance(key_id: int) -> tuple[int, int]:
    row = ApiKey.get_by_id(key_id)
    return row.balance, row.spent


def _body(max_tokens: int | None = 10, content: str = "hello there") -> tuple[dict, bytes]:
    body = {"model": "paid-model", "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body, json.dumps(body).encode()


def _worst(raw: bytes, max_tokens: int) -> int:
    return billing.prompt_upper_bound(json.loads(raw)) * PAID_IN + max_tokens * PAID_OUT


def test_reserve_holds_worst_case_and_settle_returns_the_rest(sqlite_db):
    kid = _new_key("a", "1")
    body, raw = _body(10)
    rid = billing.new_request_id()
    lease = billing.reserve(kid, PAID, body, raw, False, rid)
    worst = _worst(raw, 10)
    assert lease.reserved == worst
    assert _balance(kid) == (1_000_000 - worst, 0)
    row = Usage.get(Usage.request_id == rid)
    assert (row.state, row.reserved, row.charge) == ("held", worst, 0)
    ledger_check(sqlite_db)
    _init(sqlite_db)

    usage = {"prompt_tokens": 6, "completion_tokens": 5}
    charge = billing.settle(lease, Outcome(status=200, usage=usage, produced=True, latency_ms=12.0, ttfb_ms=3.0))
    assert charge == 16_000
    assert _balance(kid) == (1_000_000 - 16_000, 16_000)
    row = Usage.get(Usage.request_id == rid)
    assert (row.state, row.charge, row.prompt_tokens, row.completion_tokens, row.estimated, row.status) == (
        "settled", 16_000, 6, 5, False, 200)
    # settling again (same lease or a copy of it) changes nothing
    assert billing.settle(lease, Outcome(status=200, usage=usage, produced=True)) == 0
    copy = Lease(request_id=rid, key_id=kid, model=PAID, stream=False, prompt_bytes=len(raw), reserved=worst)
    assert billing.settle(copy, Outcome(status=200, usage={"prompt_tokens": 99, "completion_tokens": 99},
                                        produced=True)) == 0
    assert _balance(kid) == (1_000_000 - 16_000, 16_000)
    assert Usage.select().count() == 1
    ledger_check(sqlite_db)


def test_a_settlement_that_fails_is_retried_not_lost(sqlite_db, tmp_path):
    kid = _new_key("retry", "1")
    body, raw = _body(10)
    rid = billing.new_request_id()
    lease = billing.reserve(kid, PAID, body, raw, False, rid)
    outcome = Outcome(status=200, usage={"prompt_tokens": 6, "completion_tokens": 5}, produced=True)

    db.initialize(make_database(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}"))   # the database is gone
    billing.PENDING.clear()
    assert billing.settle_or_defer(lease, outcome) == 0          # no exception reaches the caller
    assert len(billing.PENDING) == 1 and not lease.settled
    assert billing.retry_pending() == 0 and len(billing.PENDING) == 1   # still down: kept

    _init(sqlite_db)                                              # it is back
    assert Usage.get(Usage.request_id == rid).state == "held"
    assert billing.retry_pending() == 1 and not billing.PENDING
    row = Usage.get(Usage.request_id == rid)
    assert (row.state, row.charge) == ("settled", 16_000)
    assert _balance(kid) == (1_000_000 - 16_000, 16_000)
    assert billing.retry_pending() == 0
    ledger_check(sqlite_db)


def test_request_ids_are_unique_and_in_time_order():
    """Time-ordered, so the ledger's unique index on them grows at its end (see new_request_id)."""
    ids = [billing.new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) <= 40 and i.startswith("req_") and int(i[4:], 16) >= 0 for i in ids)
    stamps = [int(i[4:16], 16) for i in ids]
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] / 1000 - __import__("time").time()) < 5


def test_a_failed_reserve_rolls_back_what_it_took(sqlite_db):
    """The hold INSERT fails (a request id used twice): the balance taken in the same transaction comes back."""
    kid = _new_key("twice", "1")
    body, raw = _body(10)
    rid = billing.new_request_id()
    billing.reserve(kid, PAID, body, raw, False, rid)
    after_first = _balance(kid)
    with pytest.raises(billing.ServiceUnavailable):
        billing.reserve(kid, PAID, body, raw, False, rid)
    assert _balance(kid) == after_first
    assert Usage.select().count() == 1
    lease = billing.reserve(kid, PAID, body, raw, False, billing.new_request_id())   # the writer still works
    assert lease.reserved > 0


def _forked_reserve(url, kid, raw, body, queue):
    from app.store import models
    inherited = models.WRITER._conn is not None
    lease = billing.reserve(kid, PAID, json.loads(raw), raw, False, billing.new_request_id())
    billing.settle(lease, Outcome(status=200, produced=True, usage={"prompt_tokens": 1, "completion_tokens": 1}))
    queue.put(inherited)


def test_a_forked_worker_opens_its_own_writer_connection(sqlite_db):
    kid = _new_key("forked", "1")
    body, raw = _body(10)
    billing.reserve(kid, PAID, body, raw, False, billing.new_request_id())
    from app.store import models
    assert models.WRITER._conn is not None            # the parent has one open...
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_forked_reserve, args=(sqlite_db, kid, raw, body, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    inherited = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert inherited == [False, False, False]                # ...that no child uses
    billing.reserve(kid, PAID, body, raw, False, billing.new_request_id())
    assert Usage.select().where(Usage.state == "settled").count() == 3
    ledger_check(sqlite_db)


def test_reserve_refuses_without_changing_anything(sqlite_db):
    kid = _new_key("poor", "0.05")
    body, raw = _body(100)
    with pytest.raises(InsufficientCredits) as info:
        billing.reserve(kid, PAID, body, raw, False, billing.new_request_id())
    err = info.value
    assert err.status == 402 and err.type == "insufficient_quota"
    assert "balance is 0.05" in err.message
    assert _balance(kid) == (50_000, 0)
    assert Usage.select().count() == 0


def test_refusal_names_a_max_tokens_that_is_admitted(sqlite_db):
    """The 402 message's max_tokens, asked for in the same request, is admitted (with or without a limit)."""
    kid = _new_key("fit", "0.2")
    for asked in (100, None, 80, 99999):       # each over the balance (prompt bound ~55 tokens)
        body, raw = _body(asked)
        with pytest.raises(InsufficientCredits) as info:
            billing.reserve(kid, PAID, body, raw, False, billing.new_request_id())
        fits = int(info.value.message.split("max_tokens=")[1].split(";")[0])
        assert fits > 0
        body, raw = _body(fits)
        lease = billing.reserve(kid, PAID, body, raw, False, billing.new_request_id())
        billing.settle(lease, Outcome(produced=False))     # give it back
        assert _balance(kid) == (200_000, 0)
    ledger_check(sqlite_db)


def test_a_worst_case_beyond_the_database_is_a_402_that_changes_nothing(sqlite_db):
    """A limit the validation accepts, at a price that makes the worst case larger than a BIGINT: 402 stating
    the limit the balance covers, never an overflow (it was an OverflowError, a 500, before)."""
    dear = Model(id="dear", provider=PROVIDER, upstream_model="dear", owned_by="mock",
                 input_price=Decimal(1), output_price=Decimal(10**10), max_output_tokens=100)
    kid = _new_key("dear", "1000")
    body, raw = _body(billing.MAX_TOKENS)
    with pytest.raises(InsufficientCredits) as info:
        billing.reserve(kid, dear, body, raw, False, billing.new_request_id())
    assert "balance is 1000." in info.value.message and "Top up" in info.value.message
    assert _balance(kid) == (1_000_000_000, 0) and Usage.select().count() == 0
    ledger_check(sqlite_db)


def test_reported_usage_beyond_the_token_columns_is_clamped(sqlite_db):
    """An upstream that reports absurd usage cannot make the settlement fail (and retry) forever."""
    lease = _lease(reserved=0)
    pt = billing.charge_for(lease, Outcome(usage={"prompt_tokens": 10**30, "completion_tokens": 2**63}))[1:3]
    assert pt == (billing.MAX_TOKENS, billing.MAX_TOKENS)
    kid = _new_key("absurd", "1")
    body, raw = _body(10)
    rid = billing.new_request_id()
    lease = billing.reserve(kid, PAID, body, raw, False, rid)
    billing.settle(lease, Outcome(status=200, produced=True, usage={"prompt_tokens": 10**20, "completion_tokens": 1}))
    row = Usage.get(Usage.request_id == rid)
    assert (row.state, row.prompt_tokens, row.charge) == ("settled", billing.MAX_TOKENS, 1_000_000)   # all it had
    assert _balance(kid) == (0, 1_000_000)
    ledger_check(sqlite_db)


def test_free_model_reserves_nothing_and_records_a_row(sqlite_db):
    kid = _new_key("free", "0")
    body, raw = _body(None)
    rid = billing.new_request_id()
    lease = billing.reserve(kid, FREE, body, raw, True, rid)
    assert lease.reserved == 0 and _balance(kid) == (0, 0)
    assert all(r.reserved == 0 for r in Usage.select())         # a free model never holds credit
    assert billing.settle(lease, Outcome(status=200, usage={"prompt_tokens": 5, "completion_tokens": 3},
                                         produced=True)) == 0
    row = Usage.get(Usage.request_id == rid)
    assert (row.state, row.charge, row.prompt_tokens, row.completion_tokens, row.model) == (
        "settled", 0, 5, 3, "free-model")
    assert _balance(kid) == (0, 0)
    ledger_check(sqlite_db)


def test_usage_beyond_the_reservation_never_makes_a_balance_negative(sqlite_db):
    kid = _new_key("over", "0.3")
    body, raw = _body(5)
    lease = billing.reserve(kid, PAID, body, raw, False, billing.new_request_id())
    left = 300_000 - lease.reserved
    assert left > 0
    # the upstream reports far more than max_tokens: take what the balance still has, never more
    charge = billing.settle(lease, Outcome(status=200, usage={"prompt_tokens": 10, "completion_tokens": 10_000},
                                           produced=True))
    assert charge == lease.reserved + left == 300_000
    assert _balance(kid) == (0, 300_000)
    assert Usage.get(Usage.request_id == lease.request_id).charge == 300_000
    # slightly beyond the reservation, with enough balance: charged exactly
    kid = _new_key("over2", "1")
    lease = billing.reserve(kid, PAID, body, raw, False, billing.new_request_id())
    exact = 10 * 1000 + 60 * 2000
    assert lease.reserved < exact
    assert billing.settle(lease, Outcome(status=200, usage={"prompt_tokens": 10, "completion_tokens": 60},
                                         produced=True)) == exact
    assert _balance(kid) == (1_000_000 - exact, exact)
    ledger_check(sqlite_db)


def test_estimated_settlement_is_recorded(sqlite_db):
    kid = _new_key("est", "1")
    body, raw = _body(50)
    rid = billing.new_request_id()
    lease = billing.reserve(kid, PAID, body, raw, True, rid)
    charge = billing.settle(lease, Outcome(status=200, produced=True, delivered_events=4, outcome="client_closed"))
    expected = math.ceil(len(raw) / 4) * 1000 + 4 * 2000
    assert charge == expected
    row = Usage.get(Usage.request_id == rid)
    assert row.estimated is True and row.charge == expected and row.outcome == "client_closed"
    ledger_check(sqlite_db)


# --------------------------------------------------------------------------------------------------
# concurrency: N worst cases on the balance -> exactly N reservations, in threads and in processes
# --------------------------------------------------------------------------------------------------

N_FIT = 6


def _reserve_once(key_id: int, raw: bytes, body: dict) -> str:
    try:
        billing.reserve(key_id, PAID, body, raw, False, billing.new_request_id())
        return "ok"
    except InsufficientCredits:
        return "402"
    finally:
        if not db.is_closed():
            db.close()


def _check_exact(url: str, key_id: int, opening: int, worst: int, results: list[str]) -> None:
    assert results.count("ok") == N_FIT, results
    assert results.count("402") == len(results) - N_FIT, results
    _init(url)
    with db.connection_context():
        assert _balance(key_id) == (opening - N_FIT * worst, 0)
        assert Usage.select().where((Usage.key == key_id) & (Usage.state == "held")).count() == N_FIT
        assert Usage.select(fn.SUM(Usage.reserved)).where(Usage.key == key_id).scalar() == N_FIT * worst
        assert CreditEntry.select().where(CreditEntry.key == key_id).count() == 1
    ledger_check(url)


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def any_db(request, tmp_path):
    database = Database(request.param, tmp_path)
    _init(database.url)
    yield database.url
    db.close_all()
    database.drop()


def test_concurrent_reserve_threads(any_db):
    body, raw = _body(10)
    worst = _worst(raw, 10)
    opening = N_FIT * worst + worst - 1
    kid = _new_key("threads", str(to_credits(opening)))
    n = 24
    barrier = threading.Barrier(n)
    results: list[str] = []

    def run():
        barrier.wait()
        results.append(_reserve_once(kid, raw, body))

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    _check_exact(any_db, kid, opening, worst, results)


def _child(url, key_id, raw, body, barrier, queue, attempts):
    db.initialize(make_database(url))    # never use a connection inherited across the fork
    barrier.wait(30)
    for _ in range(attempts):
        queue.put(_reserve_once(key_id, raw, body))


def test_concurrent_reserve_processes(any_db):
    body, raw = _body(10)
    worst = _worst(raw, 10)
    opening = N_FIT * worst + worst - 1
    kid = _new_key("procs", str(to_credits(opening)))
    db.close_all()
    ctx = multiprocessing.get_context("fork")
    procs_n, attempts = 6, 4
    barrier, queue = ctx.Barrier(procs_n), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(any_db, kid, raw, body, barrier, queue, attempts))
             for _ in range(procs_n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in range(procs_n * attempts)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    _check_exact(any_db, kid, opening, worst, results)


def test_concurrent_reserve_and_settle_on_one_key(any_db):
    """Reserves and settles of one key interleaving in many threads: no deadlock, no error, exact ledger."""
    body, raw = _body(10)
    kid = _new_key("busy", "1000")
    errors: list[BaseException] = []
    charges: list[int] = []
    barrier = threading.Barrier(12)

    def run():
        barrier.wait()
        for i in range(10):
            try:
                model = FREE if i % 5 == 4 else PAID
                lease = billing.reserve(kid, model, body, raw, False, billing.new_request_id())
                charges.append(billing.settle(lease, Outcome(status=200, produced=True,
                                                             usage={"prompt_tokens": 5, "completion_tokens": i})))
            except Exception as err:         # a deadlock surfaces as ServiceUnavailable (reserve) or raw (settle)
                errors.append(err)
            finally:
                if not db.is_closed():
                    db.close()

    threads = [threading.Thread(target=run) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(charges) == 120
    with db.connection_context():
        assert _balance(kid) == (1_000_000_000 - sum(charges), sum(charges))
        assert Usage.select().where(Usage.state == "settled").count() == 120
    ledger_check(any_db)
