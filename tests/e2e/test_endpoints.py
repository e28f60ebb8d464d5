"""Issue 16's endpoints end to end: gunicorn + the fake upstream speaking each API, with the real OpenAI and
Anthropic SDKs as clients: GET /models/{id}, POST /embeddings, /responses, /messages, the /v1 prefix, the
answer's model field, and the credit of each to the micro-credit."""
from __future__ import annotations

import json
import time
import uuid

import anthropic
import openai
import pytest
import requests

from support import PAID_IN
from support import PAID_OUT
from support import PROVIDER_KEY
from support import Gateway
from support import ledger_check

MSG = [{"role": "user", "content": "hello there"}]     # the mock counts 2 words + 4 per message = 6 tokens

#: Micro-credits per prompt / completion token of the paid test models (prices are per 1M tokens).
IN, OUT = PAID_IN, PAID_OUT


def catalog_extra(mock) -> str:
    return f"""
[providers.resp]
base_url = "{mock.url}"
api_key_env = "MOCK_PROVIDER_KEY"
responses = true

[providers.anthro]
base_url = "http://127.0.0.1:{mock.port}/anthropic"
api_key_env = "MOCK_PROVIDER_KEY"
api = "anthropic"

[models."embed-model"]
provider = "mock"
upstream_model = "mock-embed"
kind = "embedding"
input_price = {PAID_IN}

[models."resp-model"]
provider = "resp"
upstream_model = "mock-resp"
input_price = {PAID_IN}
output_price = {PAID_OUT}
max_output_tokens = 100

[models."claude-model"]
provider = "anthro"
upstream_model = "mock-claude"
input_price = {PAID_IN}
output_price = {PAID_OUT}
max_output_tokens = 100

[models."deepseek/deepseek-chat"]
provider = "mock"
upstream_model = "mock-ds"
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, mock):
    g = Gateway(tmp_path_factory.mktemp("gw"), mock.url, catalog_extra=catalog_extra(mock)).start()
    yield g
    g.stop()


def new_key(gw, **opts) -> tuple[str, str]:
    name = "e-" + uuid.uuid4().hex[:8]
    return name, gw.create_key(name, **opts)


def spent(gw, name) -> int:
    """The key's spending in micro-credits, after checking the ledger identity of every key."""
    return ledger_check(gw.database_url)[name][1]


def ledger_rows(gw, name) -> list[dict]:
    from app.store.models import ApiKey
    from app.store.models import Usage
    from app.store.models import db
    from app.store.models import make_database

    db.initialize(make_database(gw.database_url))
    with db.connection_context():
        rows = list(Usage.select(Usage.model, Usage.charge, Usage.prompt_tokens, Usage.completion_tokens,
                                 Usage.estimated, Usage.outcome, Usage.state)
                    .join(ApiKey).where(ApiKey.name == name).order_by(Usage.id).dicts())
    db.close()
    return rows


def settled_rows(gw, name) -> list[dict]:
    """The key's ledger rows once none is held: a stream that ended in an error event settles just after the
    event went out (bounded wait, no timing assert)."""
    for _ in range(100):
        rows = ledger_rows(gw, name)
        if all(r["state"] == "settled" for r in rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"rows still held: {rows}")


def remaining_rpm(gw, key) -> int:
    return requests.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {key}"},
                        timeout=10).json()["data"]["remaining_rpm"]


def claude(gw, key, prefix: str = "", **kw) -> anthropic.Anthropic:
    """The Anthropic SDK on the gateway: it appends /v1/messages to base_url, so "" is /v1 and "/api" /api/v1."""
    return anthropic.Anthropic(api_key=key, base_url=gw.url + prefix, max_retries=0, **kw)


def anthropic_error(resp, status, kind) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind and body["error"]["message"]
    assert PROVIDER_KEY not in resp.text
    return body["error"]


# --------------------------------------------------------------------------------------------------
# GET /models/{id} and the /v1 prefix
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
def test_models_retrieve_under_both_prefixes(gw, prefix):
    _, key = new_key(gw)
    client = openai.OpenAI(api_key=key, base_url=gw.url + prefix, max_retries=0)
    got = client.models.retrieve("free-model")
    assert (got.id, got.object, got.owned_by) == ("free-model", "model", "mock-owner")
    assert client.models.retrieve("deepseek/deepseek-chat").id == "deepseek/deepseek-chat"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found" and "no-such-model" in err.value.body["message"]
    assert "embed-model" in {m.id for m in client.models.list().data}


def test_the_v1_prefix_serves_every_route(gw, mock):
    _, key = new_key(gw)
    client = openai.OpenAI(api_key=key, base_url=gw.url + "/v1", max_retries=0)
    out = client.chat.completions.create(model="free-model", messages=MSG)
    assert out.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert requests.get(gw.url + "/v1/key", headers={"Authorization": f"Bearer {key}"}, timeout=10).ok
    assert requests.get(gw.url + "/v1/models", timeout=10).status_code == 401       # the same auth
    resp = requests.get(gw.url + "/v1/nope", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_the_answers_model_is_the_catalogue_id_on_chat(gw):
    _, key = new_key(gw)
    client = gw.client(key)
    raw = client.chat.completions.with_raw_response.create(model="free-model", messages=MSG)
    assert raw.headers["X-Boundless-Upstream-Model"] == "mock-model"
    assert raw.parse().model == "free-model"
    chunks = list(client.chat.completions.create(model="free-model", messages=MSG, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks and all(c.model == "free-model" for c in chunks)
    assert chunks[-1].usage.prompt_tokens == 6


# --------------------------------------------------------------------------------------------------
# POST /embeddings
# --------------------------------------------------------------------------------------------------

def test_embeddings_with_the_sdk_billed_on_prompt_tokens(gw, mock):
    name, key = new_key(gw, credit=10)
    client = gw.client(key)
    mock.reset()
    raw = client.embeddings.with_raw_response.create(model="embed-model", input=["hello world", "a b c"])
    out = raw.parse()                                 # the SDK asked for base64 and decoded it
    assert raw.headers["X-Boundless-Upstream-Model"] == "mock-embed"
    assert out.model == "embed-model" and len(out.data) == 2 and len(out.data[0].embedding) == 8
    assert out.data[1].embedding[0] == pytest.approx(0.002)
    assert out.usage.prompt_tokens == 5
    got = mock.last()
    assert got["path"] == "/v1/embeddings" and got["body"]["model"] == "mock-embed"
    assert got["body"]["input"] == ["hello world", "a b c"] and got["body"]["encoding_format"] == "base64"
    assert got["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}" and key not in json.dumps(got)
    assert spent(gw, name) == 5 * IN

    floats = client.embeddings.create(model="embed-model", input=[[1, 2, 3], [4]], encoding_format="float",
                                      dimensions=4)
    assert [len(d.embedding) for d in floats.data] == [4, 4] and floats.usage.prompt_tokens == 4
    assert mock.last()["body"]["dimensions"] == 4
    assert spent(gw, name) == 9 * IN
    rows = ledger_rows(gw, name)
    assert [(r["model"], r["prompt_tokens"], r["completion_tokens"], r["estimated"]) for r in rows] == [
        ("embed-model", 5, 0, False), ("embed-model", 4, 0, False)]


def test_a_model_on_the_wrong_endpoint_is_400_naming_it_and_costs_nothing(gw):
    name, key = new_key(gw, credit=10)
    client = gw.client(key)
    before = remaining_rpm(gw, key)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="paid-model", input="hello")
    assert err.value.body["code"] == "wrong_model_kind" and "'paid-model'" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="embed-model", messages=MSG)
    assert err.value.body["code"] == "wrong_model_kind" and "'embed-model'" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="paid-model", input="hello")
    assert err.value.body["code"] == "endpoint_not_supported" and "responses = true" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="claude-model", messages=MSG)
    assert err.value.body["code"] == "endpoint_not_supported" and "'claude-model'" in err.value.body["message"]
    assert remaining_rpm(gw, key) == before                  # 400s do not count
    assert spent(gw, name) == 0 and ledger_rows(gw, name) == []


# --------------------------------------------------------------------------------------------------
# POST /responses
# --------------------------------------------------------------------------------------------------

def test_responses_json_and_stream_with_the_sdk(gw, mock):
    name, key = new_key(gw, credit=10)
    client = gw.client(key)
    mock.reset()
    raw = client.responses.with_raw_response.create(model="resp-model", input="hello there", max_output_tokens=50)
    out = raw.parse()
    assert out.output_text == "tok0 tok1 tok2 tok3 tok4" and out.model == "resp-model"
    assert raw.headers["X-Boundless-Upstream-Model"] == "mock-resp"
    assert (out.usage.input_tokens, out.usage.output_tokens) == (6, 5)
    got = mock.last()
    assert got["path"] == "/v1/responses" and got["body"]["model"] == "mock-resp"
    assert got["body"]["max_output_tokens"] == 50 and got["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert spent(gw, name) == 6 * IN + 5 * OUT

    events = list(client.responses.create(model="resp-model", input=[{"role": "user", "content": "hello there"}],
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "tok0 tok1 tok2 tok3 tok4"
    assert all(e.response.model == "resp-model" for e in events if hasattr(e, "response"))
    assert events[-1].response.usage.output_tokens == 5
    assert "stream_options" not in mock.last()["body"]        # chat's usage request is chat's only
    assert spent(gw, name) == 2 * (6 * IN + 5 * OUT)          # settled at response.completed, exactly


def test_a_cut_responses_stream_is_estimated(gw):
    name, key = new_key(gw, credit=10)
    client = gw.client(key)
    with pytest.raises(openai.APIError):
        for _ in client.responses.create(model="resp-model", input="hello there", stream=True,
                                         extra_body={"mock": {"cut_after": 2}}):
            pass
    rows = settled_rows(gw, name)
    assert len(rows) == 1 and rows[0]["estimated"] and rows[0]["outcome"] == "upstream_cut"
    assert rows[0]["completion_tokens"] == 2 and rows[0]["charge"] > 0
    assert spent(gw, name) == rows[0]["charge"]


# --------------------------------------------------------------------------------------------------
# POST /messages (Anthropic)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "/api"])
def test_messages_with_the_anthropic_sdk_and_x_api_key(gw, mock, prefix):
    name, key = new_key(gw, credit=10)
    mock.reset()
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 7, "output_tokens": 4}
    raw = claude(gw, key, prefix).messages.with_raw_response.create(
        model="claude-model", max_tokens=50, messages=MSG,
        extra_headers={"anthropic-beta": "tools-2024-05-16", "anthropic-version": "2099-01-01"},
        extra_body={"mock": {"usage": usage}})
    out = raw.parse()
    assert out.content[0].text == "tok0 tok1 tok2 tok3 tok4" and out.model == "claude-model"
    assert raw.headers["X-Boundless-Upstream-Model"] == "mock-claude"
    got = mock.last()
    assert got["path"] == "/anthropic/v1/messages" and got["body"]["model"] == "mock-claude"
    assert got["headers"]["x-api-key"] == PROVIDER_KEY and "authorization" not in got["headers"]
    assert got["headers"]["anthropic-version"] == "2099-01-01"          # the caller's, as it sent it
    assert got["headers"]["anthropic-beta"] == "tools-2024-05-16"
    assert key not in json.dumps(got)
    assert spent(gw, name) == (10 + 3 + 7) * IN + 4 * OUT


def test_messages_stream_with_a_bearer_key(gw):
    name, key = new_key(gw, credit=10)
    client = anthropic.Anthropic(auth_token=key, base_url=gw.url, max_retries=0)
    with client.messages.stream(model="claude-model", max_tokens=50, messages=MSG) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 tok4" and final.model == "claude-model"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 5)
    assert spent(gw, name) == 6 * IN + 5 * OUT
    events = list(client.messages.create(model="claude-model", max_tokens=50, messages=MSG, stream=True))
    assert events[0].type == "message_start" and events[0].message.model == "claude-model"
    assert events[-1].type == "message_stop"
    assert spent(gw, name) == 2 * (6 * IN + 5 * OUT)


def test_messages_errors_are_anthropic_shaped(gw, mock):
    name, key = new_key(gw, credit=10)
    url = gw.url + "/v1/messages"
    body = {"model": "claude-model", "max_tokens": 50, "messages": MSG}
    anthropic_error(requests.post(url, json=body, timeout=10), 401, "authentication_error")
    anthropic_error(requests.post(url, json=body, headers={"x-api-key": "sk-nope"}, timeout=10), 401,
                    "authentication_error")
    auth = {"x-api-key": key}
    err = anthropic_error(requests.post(url, json={**body, "model": "nope"}, headers=auth, timeout=10), 404,
                          "not_found_error")
    assert "'nope'" in err["message"]
    err = anthropic_error(requests.post(url, json={**body, "model": "paid-model"}, headers=auth, timeout=10), 400,
                          "invalid_request_error")
    assert "'paid-model'" in err["message"]
    anthropic_error(requests.post(url, json={**body, "messages": []}, headers=auth, timeout=10), 400,
                    "invalid_request_error")
    _, poor = new_key(gw)
    anthropic_error(requests.post(url, json=body, headers={"x-api-key": poor}, timeout=10), 402, "billing_error")
    # The provider's own Anthropic-shaped 400 passes through as it is.
    failing = {**body, "mock": {"status": 400, "error": {"type": "invalid_request_error", "message": "too long"}}}
    err = anthropic_error(requests.post(url, json=failing, headers=auth, timeout=10), 400, "invalid_request_error")
    assert err["message"] == "too long"
    with pytest.raises(anthropic.NotFoundError):
        claude(gw, key).messages.create(model="nope", max_tokens=5, messages=MSG)
    # A stream cut after it began ends with Anthropic's error event, which the SDK raises; estimated.
    with pytest.raises(anthropic.APIStatusError):
        list(claude(gw, key).messages.create(model="claude-model", max_tokens=50, messages=MSG, stream=True,
                                             extra_body={"mock": {"cut_after": 2}}))
    rows = settled_rows(gw, name)
    assert [(r["outcome"], r["estimated"], r["completion_tokens"]) for r in rows] == [
        ("upstream_error", False, 0), ("upstream_cut", True, 2)]
    assert spent(gw, name) == rows[1]["charge"] > 0


# --------------------------------------------------------------------------------------------------
# Limits: each endpoint counts one request
# --------------------------------------------------------------------------------------------------

def test_each_endpoint_counts_one_request_and_429s_in_its_shape(gw):
    name, key = new_key(gw, credit=10, rpm=4)
    client = gw.client(key)
    client.models.retrieve("free-model")                          # a read: not counted
    client.embeddings.create(model="embed-model", input="hello")
    client.responses.create(model="resp-model", input="hello")
    claude(gw, key).messages.create(model="claude-model", max_tokens=5, messages=MSG)
    client.chat.completions.create(model="free-model", messages=MSG)
    resp = requests.post(gw.url + "/v1/messages", headers={"x-api-key": key}, timeout=10,
                         json={"model": "claude-model", "max_tokens": 5, "messages": MSG})
    anthropic_error(resp, 429, "rate_limit_error")
    assert int(resp.headers["Retry-After"]) > 0
    with pytest.raises(openai.RateLimitError) as err:
        client.with_options(max_retries=0).embeddings.create(model="embed-model", input="hello")
    assert err.value.body["code"] == "rate_limit_exceeded"
    assert len(ledger_rows(gw, name)) == 4 and spent(gw, name) > 0


# --------------------------------------------------------------------------------------------------
# The per-key policy on every endpoint (app/api/flow.py resolve: one check for all of them)
# --------------------------------------------------------------------------------------------------

def test_a_models_allow_list_holds_on_every_endpoint_at_no_cost(gw):
    name, key = new_key(gw, credit=10, models="free-model")
    client = gw.client(key)
    assert [m.id for m in client.models.list().data] == ["free-model"]
    assert client.models.retrieve("free-model").id == "free-model"
    with pytest.raises(openai.NotFoundError):                    # not allowed: unknown to this key
        client.models.retrieve("embed-model")
    before = remaining_rpm(gw, key)
    calls = [
        lambda: client.embeddings.create(model="embed-model", input="hi"),
        lambda: client.responses.create(model="resp-model", input="hi", max_output_tokens=20),
        lambda: client.chat.completions.create(model="paid-model", messages=MSG, max_tokens=5),
    ]
    for call in calls:
        with pytest.raises(openai.PermissionDeniedError) as err:
            call()
        assert err.value.code == "model_not_allowed"
    resp = requests.post(gw.url + "/v1/messages", headers={"x-api-key": key}, timeout=10,
                         json={"model": "claude-model", "max_tokens": 20, "messages": MSG})
    assert anthropic_error(resp, 403, "permission_error")
    assert "'claude-model'" in resp.json()["error"]["message"]
    assert remaining_rpm(gw, key) == before                       # refused before the count
    assert ledger_rows(gw, name) == [] and spent(gw, name) == 0
