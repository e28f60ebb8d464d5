"""app.upstream.client against a real HTTP server on 127.0.0.1: what each provider's request carries, and how the
transport's failures become the gateway's errors."""
from __future__ import annotations

import json
import socket

import pytest

from app.catalog import Model
from app.catalog import Provider
from app.errors import UpstreamError
from app.errors import UpstreamTimeout
from app.upstream.client import UpstreamClient
from support import echo_server


@pytest.fixture(scope="module")
def echo():
    with echo_server() as port:
        yield port


def _model(provider: Provider) -> Model:
    return Model(id="m", provider=provider, upstream_model="up", owned_by="x")


def _call(client: UpstreamClient, provider: Provider, stream: bool = False) -> dict:
    resp = client.open(_model(provider), b'{"model": "up"}', stream)
    assert resp.status_code == 200
    return json.loads(client.read_body(resp, provider.name))


def test_each_provider_gets_its_own_headers_and_key_even_on_one_url(echo, monkeypatch):
    monkeypatch.setenv("KEY_A", "secret-a")
    url = f"http://127.0.0.1:{echo}/v1"
    a = Provider("a", url, "KEY_A", {"OpenAI-Organization": "org-a"})
    b = Provider("b", url, "KEY_A", {"OpenAI-Organization": "org-b"})     # same URL, same key
    client = UpstreamClient()
    for _ in range(2):                                   # and again from the cached request heads
        got_a, got_b = _call(client, a), _call(client, b)
        assert got_a["path"] == got_b["path"] == "/v1/chat/completions"
        assert got_a["body"] == '{"model": "up"}'
        assert got_a["headers"]["OpenAI-Organization"] == "org-a" and got_a["headers"]["Authorization"] == "Bearer secret-a"
        assert got_a["headers"]["Accept"] == "application/json"
        assert got_b["headers"]["OpenAI-Organization"] == "org-b" and got_b["headers"]["Authorization"] == "Bearer secret-a"
        assert got_b["headers"]["Accept"] == "application/json"
        assert _call(client, b, stream=True)["headers"]["Accept"] == "text/event-stream"
        assert got_a["headers"]["Host"] == f"127.0.0.1:{echo}"
    monkeypatch.setenv("KEY_A", "secret-rotated")         # a key changed in the environment is used at once
    assert _call(client, a)["headers"]["Authorization"] == "Bearer secret-rotated"
    keyless = Provider("c", url, None)
    assert "Authorization" not in _call(client, keyless)["headers"]


def test_a_header_value_that_would_split_the_request_is_refused():
    provider = Provider("bad", "http://127.0.0.1:9/v1", None, {"X-Bad": "a\r\nX-Injected: 1"})
    with pytest.raises(UpstreamError, match="invalid header"):
        UpstreamClient().open(_model(provider), b"{}", False)


def test_transport_failures_become_gateway_errors():
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]
    with pytest.raises(UpstreamError, match="could not be reached"):
        UpstreamClient().open(_model(Provider("gone", f"http://127.0.0.1:{closed_port}/v1", None)), b"{}", False)
    with socket.create_server(("127.0.0.1", 0)) as silent:   # accepts, never answers
        port = silent.getsockname()[1]
        with pytest.raises(UpstreamTimeout, match="did not answer in time"):
            UpstreamClient(read_timeout=0.3).open(_model(Provider("mute", f"http://127.0.0.1:{port}/v1", None)),
                                                  b"{}", False)
