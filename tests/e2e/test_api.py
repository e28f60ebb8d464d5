"""/api/v1 end to end: gunicorn + the fake upstream, with the OpenAI SDK and plain HTTP as clients."""
from __future__ import annotations

import json
from decimal import Decimal

import openai
import pytest
import requests

from support import PROVIDER_KEY
from support import free_port

MSG = [{"role": "user", "content": "hello there"}]


def post(gw, key, body, **kw):
    headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
    data = json.dumps(body) if isinstance(body, (dict, list)) else body
    return requests.post(gw.base_url + "/chat/completions", data=data, headers=headers, timeout=30, **kw)


def assert_openai_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and isinstance(err["message"], str)
    assert "Traceback" not in resp.text and PROVIDER_KEY not in resp.text
    if code is not None:
        assert err["code"] == code
    return err


# --------------------------------------------------------------------------------------------------
# The happy paths, with the official SDK
# --------------------------------------------------------------------------------------------------

def test_models_list_with_the_sdk(gateway, key):
    models = gateway.client(key).models.list()
    ids = {m.id: m for m in models.data}
    assert set(ids) == {"free-model", "paid-model"}
    assert ids["free-model"].owned_by == "mock-owner" and ids["free-model"].object == "model"


def test_chat_with_the_sdk_forwards_with_the_provider_key(gateway, key, mock):
    mock.reset()
    out = gateway.client(key).chat.completions.create(model="free-model", messages=MSG, temperature=0.7,
                                                      max_tokens=50)
    assert out.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens == 2 + 4
    got = mock.last()
    assert got["path"] == "/v1/chat/completions"
    assert got["body"]["model"] == "mock-model"                  # replaced by the upstream name
    assert got["body"]["temperature"] == 0.7 and got["body"]["max_tokens"] == 50
    assert got["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert key not in json.dumps(got)                            # the caller's key never goes upstream


def test_stream_with_the_sdk(gateway, key):
    stream = gateway.client(key).chat.completions.create(model="free-model", messages=MSG, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"


def test_stream_over_http_is_sse_and_ends_with_done(gateway, key):
    with post(gateway, key, {"model": "free-model", "messages": MSG, "stream": True}, stream=True) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["Cache-Control"] == "no-cache"
        body = resp.raw.read().decode()
    events = [e for e in body.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_every_other_field_passes_through_both_ways(gateway, key, mock):
    mock.reset()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    vision = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                           {"type": "image_url", "image_url": {"url": "https://x.test/i.png"}}]}]
    body = {"model": "free-model", "messages": vision, "tools": tools, "tool_choice": "auto",
            "response_format": {"type": "json_object"}, "reasoning_effort": "high", "x_vendor": {"a": [1, 2.5]},
            "big": 123456789012345678901234567890, "mock": {"echo_headers": True}}
    resp = post(gateway, key, body, headers={"OpenAI-Organization": "org-1", "X-Custom": "1"})
    assert resp.status_code == 200, resp.text
    sent = mock.last()["body"]
    for field in ("messages", "tools", "tool_choice", "response_format", "reasoning_effort", "x_vendor", "big"):
        assert sent[field] == body[field], field
    # the answer's own extra fields come back unchanged, and caller headers are not forwarded upstream
    echoed = resp.json()["echo_headers"]
    assert "openai-organization" not in echoed and "x-custom" not in echoed
    assert echoed["authorization"] == f"Bearer {PROVIDER_KEY}"


def test_chunked_request_body(gateway, key):
    payload = json.dumps({"model": "free-model", "messages": MSG}).encode()
    resp = post(gateway, key, iter([payload[:10], payload[10:]]))          # Transfer-Encoding: chunked
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith("tok0")


def test_no_cookie_travels_between_callers(gateway, mock):
    a, b = gateway.create_key(), gateway.create_key()
    assert post(gateway, a, {"model": "free-model", "messages": MSG, "mock": {"set_cookie": True}}).ok
    resp = post(gateway, a, {"model": "free-model", "messages": MSG})
    assert "set-cookie" not in {k.lower() for k in resp.headers}
    mock.reset()
    assert post(gateway, b, {"model": "free-model", "messages": MSG}).ok
    assert "cookie" not in mock.last()["headers"]


# --------------------------------------------------------------------------------------------------
# Errors: always OpenAI-shaped JSON
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "param"), [
    ("{not json", None),
    ("[1, 2]", None),
    ('"just a string"', None),
    ({"messages": MSG}, "model"),
    ({"model": 42, "messages": MSG}, "model"),
    ({"model": "free-model"}, "messages"),
    ({"model": "free-model", "messages": []}, "messages"),
    ({"model": "free-model", "messages": "hi"}, "messages"),
    ({"model": "free-model", "messages": ["hi"]}, "messages"),
    ({"model": "free-model", "messages": MSG, "stream": "yes"}, "stream"),
    ('{"model": "free-model", "messages": [{"role": "user", "content": "x"}], "x": ' + "[" * 100_000
     + "]" * 100_000 + "}", None),
])
def test_bad_bodies_are_400(gateway, key, body, param):
    resp = post(gateway, key, body)
    err = assert_openai_error(resp, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    # an authenticated response: it reports the limits, and counted nothing
    assert resp.headers["X-RateLimit-Remaining-RPM"] == "20" and resp.headers["X-RateLimit-Remaining-RPD"] == "50"


def test_keys_missing_unknown_or_revoked_are_401_everywhere(gateway):
    revoked_name = "to-revoke"
    revoked = gateway.create_key(revoked_name)
    gateway.cli("keys", "revoke", revoked_name)
    for headers in ({}, {"Authorization": "Bearer sk-" + "x" * 43}, {"Authorization": f"Bearer {revoked}"},
                    {"Authorization": "Basic abc"}):
        for method, path in (("GET", "/models"), ("POST", "/chat/completions"), ("GET", "/key")):
            resp = requests.request(method, gateway.base_url + path, headers=headers,
                                    json={"model": "free-model", "messages": MSG}, timeout=10)
            err = assert_openai_error(resp, 401, "invalid_api_key")
            assert revoked not in resp.text                              # never echo a key


def test_sdk_sees_401(gateway):
    with pytest.raises(openai.AuthenticationError):
        gateway.client("sk-unknown-key-000000000000000000000000").models.list()


def test_unknown_model_is_404_naming_it(gateway, key):
    err = assert_openai_error(post(gateway, key, {"model": "gpt-9", "messages": MSG}), 404, "model_not_found")
    assert "gpt-9" in err["message"] and err["param"] == "model"


def test_unknown_path_405_and_413(gateway, key):
    auth = {"Authorization": f"Bearer {key}"}
    assert_openai_error(requests.get(gateway.base_url + "/nope", headers=auth, timeout=10), 404)
    assert_openai_error(requests.get(gateway.url + "/", timeout=10), 404)
    resp = requests.get(gateway.base_url + "/chat/completions", headers=auth, timeout=10)
    assert_openai_error(resp, 405)
    assert "POST" in resp.headers["Allow"]
    big = json.dumps({"model": "free-model", "messages": MSG, "pad": "x" * (10 * 1024 * 1024 + 1)})
    assert_openai_error(post(gateway, key, big), 413)


@pytest.mark.parametrize(("knob", "status", "code"), [
    ({"status": 503}, 502, "upstream_error"),
    ({"status": 500}, 502, "upstream_error"),
    ({"status": 504}, 504, "upstream_timeout"),
    ({"raw_status": 502, "raw_body": "<html>bad gateway</html>", "raw_content_type": "text/html"}, 502,
     "upstream_error"),
    ({"status": 401, "error": {"message": f"Incorrect API key provided: {PROVIDER_KEY}", "type": "x",
                               "param": None, "code": "invalid_api_key"}}, 502, "upstream_error"),
    ({"status": 429}, 429, "upstream_rate_limited"),
    ({"hang": 8}, 504, "upstream_timeout"),
])
def test_upstream_failures_map_to_5xx(gateway, key, knob, status, code):
    resp = post(gateway, key, {"model": "free-model", "messages": MSG, "mock": knob})
    assert_openai_error(resp, status, code)


def test_upstream_caller_fault_passes_through(gateway, key):
    error = {"message": "This model's maximum context length is 10 tokens", "type": "invalid_request_error",
             "param": "messages", "code": "context_length_exceeded"}
    resp = post(gateway, key, {"model": "free-model", "messages": MSG, "mock": {"status": 400, "error": error}})
    assert resp.status_code == 400 and resp.json() == {"error": error}


def test_unreachable_provider_is_502(gateway_factory):
    gw = gateway_factory(upstream_url=f"http://127.0.0.1:{free_port()}/v1")
    key = gw.create_key()
    assert_openai_error(post(gw, key, {"model": "free-model", "messages": MSG}), 502, "upstream_error")
    with pytest.raises(openai.InternalServerError):
        gw.client(key).chat.completions.create(model="free-model", messages=MSG)


def test_secrets_never_reach_the_log(gateway, key):
    post(gateway, key, {"model": "free-model", "messages": MSG})
    post(gateway, "sk-wrong-" + "z" * 40, {"model": "free-model", "messages": MSG})
    log = gateway.log()
    assert key not in log and PROVIDER_KEY not in log and "z" * 40 not in log


def test_the_gthread_worker_still_serves_everything(gateway_factory, mock):
    """gevent ships as the default; the thread-per-request worker stays a supported choice."""
    gw = gateway_factory(env={"BOUNDLESS_WORKER_CLASS": "gthread", "BOUNDLESS_THREADS": "8"})
    assert "Using worker: gthread" in gw.log()
    key = gw.create_key(credit="1")
    client = gw.client(key)
    out = client.chat.completions.create(model="paid-model", messages=MSG, max_tokens=20)
    assert out.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    stream = client.chat.completions.create(model="paid-model", messages=MSG, max_tokens=20, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "tok0 tok1 tok2 tok3 tok4"
    info = requests.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
    assert 0 < Decimal(info["data"]["spent"]) and Decimal(info["data"]["balance"]) + Decimal(info["data"]["spent"]) == 1


def test_the_shipped_worker_is_gevent(gateway):
    assert "Using worker: gevent" in gateway.log()


def test_a_provider_that_compresses_anyway_is_decoded(gateway, key):
    """We ask for identity; a provider that gzips all the same still reaches the caller as plain JSON / SSE."""
    resp = post(gateway, key, {"model": "free-model", "messages": MSG, "mock": {"gzip": True}})
    assert resp.status_code == 200 and "Content-Encoding" not in resp.headers
    assert resp.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4"
    stream = gateway.client(key).chat.completions.create(
        model="free-model", messages=MSG, stream=True, stream_options={"include_usage": True},
        extra_body={"mock": {"gzip": True, "chunks": 3, "gap": 0.05}})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2"
    assert chunks[-1].usage.completion_tokens == 3
