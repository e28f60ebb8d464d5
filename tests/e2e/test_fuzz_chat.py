"""A property-based fuzz of ``POST /api/v1/chat/completions`` against the running gateway (issue 15).

Random JSON values in every field the gateway reads (and in others), wrong types, lone surrogates (escaped,
and raw as invalid UTF-8), deep nesting, huge numbers, streams and not, sent as raw bodies over HTTP to a
gateway under gunicorn whose fake upstream answers normally: so any 5xx, traceback or HTML page is a gateway
bug. Paid models are the usual target, with a key that has credit and high limits, so reservations happen.
Afterwards no ledger row may be left ``held``, the ledger identity must hold, and the log has no traceback.

Bounded: at most ``MAX_EXAMPLES`` examples and about a minute (``BUDGET_S``); derandomized, so a CI run is
reproducible.
"""
from __future__ import annotations

import json
import time

import pytest
import requests
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from app.jsonio import MAX_DEPTH
from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from bench.mock_upstream import MockUpstream
from support import Gateway
from support import ledger_check

MAX_EXAMPLES = 2500
BUDGET_S = 60.0

LONE = ["\ud83d", "\udc00", "\udfff", "\ud800x"]
EXTREME_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from(EXTREME_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20), st.sampled_from(LONE), st.text(st.characters(codec="utf-8"), max_size=5).map(
        lambda s: s + LONE[len(s) % len(LONE)]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)

content_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=40), json_values)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
        st.fixed_dictionaries({"url": st.text(max_size=30)}), json_values)}),
    json_values)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                           "content": st.one_of(st.text(max_size=60), st.lists(content_part, max_size=3),
                                                json_values)},
                          optional={"name": json_values, "tool_calls": json_values, "tool_call_id": json_values}),
    st.dictionaries(st.text(max_size=10), json_values, max_size=3),
)
messages = st.one_of(st.lists(message, min_size=1, max_size=4), json_values)

#: The fields the gateway reads, each either plausible or any JSON value; plus random others ("mock" excluded:
#: it steers the fake upstream, which would then fail on purpose).
fields = {
    "model": st.one_of(st.sampled_from(["paid-model", "paid-model", "paid-model", "free-model"]), json_values),
    "messages": messages,
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": json_values}), json_values),
    "max_tokens": st.one_of(st.integers(1, 50), st.sampled_from(EXTREME_INTS), json_values),
    "max_completion_tokens": st.one_of(st.integers(1, 50), json_values),
    "tools": json_values,
    "n": json_values,
    "temperature": json_values,
}
bodies = st.fixed_dictionaries({"model": fields["model"], "messages": fields["messages"]},
                               optional={k: v for k, v in fields.items() if k not in ("model", "messages")}).flatmap(
    lambda body: st.dictionaries(st.text(max_size=12).filter(lambda k: k != "mock" and k not in body), json_values,
                                 max_size=2).map(lambda extra: {**body, **extra}))


@st.composite
def raw_bodies(draw) -> bytes:
    """A body as bytes: usually its JSON, sometimes with lone surrogates as raw (invalid UTF-8) bytes, a value
    nested up to far beyond the limit, or a number longer than any integer type."""
    body = draw(bodies)
    how = draw(st.sampled_from(["json", "json", "json", "raw-surrogates", "deep", "long-number", "not-json"]))
    if how == "raw-surrogates":
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    raw = json.dumps(body).encode()
    if how == "deep":
        depth = draw(st.sampled_from([MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 254, 255, 1000, 1100]))
        opener = draw(st.sampled_from([b"[", b'{"a":']))
        closer = b"]" if opener == b"[" else b"}"
        return raw[:-1] + (b', "deep": ' if len(body) else b'"deep": ') + opener * depth + b"1" * (
            opener == b"[") + (b"null" if opener != b"[" else b"") + closer * depth + b"}"
    if how == "long-number":
        digits = draw(st.sampled_from([19, 20, 40, 400, 5000]))
        return raw[:-1] + (b', "big": ' if len(body) else b'"big": ') + b"9" * digits + b"}"
    if how == "not-json":
        cut = draw(st.integers(0, max(0, len(raw) - 1)))
        return raw[:cut]
    return raw


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    # its own fake upstream, not recording: a recorded lone surrogate would break the mock's /_mock/requests
    with MockUpstream(chunks=3, gap=0.0, record=False) as mock:
        gateway = Gateway(tmp_path_factory.mktemp("fuzz"), mock.url).start()
        try:
            yield gateway
        finally:
            gateway.stop()


def test_fuzz_chat_completions(gw):
    key = gw.create_key("fuzz", rpm=100_000, rpd=100_000, credit=1_000_000)
    http = requests.Session()
    http.trust_env = False
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    deadline = time.monotonic() + BUDGET_S
    seen: dict[int, int] = {}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw=raw_bodies())
    def one(raw: bytes) -> None:
        if time.monotonic() > deadline:          # the time budget: the remaining examples are skipped
            return
        resp = http.post(gw.base_url + "/chat/completions", data=raw, headers=headers, timeout=30)
        text = resp.content.decode("utf-8", "replace")
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (raw[:300], resp.status_code, text[:500])
        assert "Traceback" not in text and "<html" not in text.lower(), (raw[:300], text[:500])
        ctype = resp.headers.get("Content-Type", "")
        if resp.status_code == 200 and ctype.startswith("text/event-stream"):
            assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, (raw[:300], text[-500:])
        else:
            assert ctype.startswith("application/json"), (raw[:300], ctype, text[:300])
            answer = json.loads(resp.content)
            if resp.status_code != 200:
                assert set(answer["error"]) == {"message", "type", "param", "code"}, text

    one()
    http.close()
    # the fuzz reached every path: refusals, JSON answers and streams (so reservations and settlements ran)
    assert seen.get(400, 0) > 10 and seen.get(200, 0) > 10, seen

    db.initialize(make_database(gw.database_url))
    try:
        with db.connection_context():
            held = 1
            for _ in range(100):                 # bounded: a stream's settlement may trail its last byte
                held = Usage.select().where(Usage.state == "held").count()
                if held == 0:
                    break
                time.sleep(0.1)
            assert held == 0
            assert Usage.select().where(Usage.model == "paid-model").count() > 10
    finally:
        db.close_all()
    ledger_check(gw.database_url)
    log = gw.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 2000:log.find("Traceback") + 3000]
