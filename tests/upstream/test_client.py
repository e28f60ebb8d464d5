"""app.upstream.client against real HTTP servers on 127.0.0.1: what each provider's request carries, how answers are
framed and read on the wire (a scripted server plays exact bytes, whole or in pieces with real pauses), and how the
transport's failures become the gateway's errors."""
from __future__ import annotations

import gzip
import json
import os
import socket
import threading
import time
import zlib

import pytest

from app.catalog import Model
from app.catalog import Provider
from app.errors import UpstreamError
from app.errors import UpstreamTimeout
from app.upstream.client import UpstreamClient
from app.upstream.client import close
from app.upstream.client import iter_raw
from app.upstream.client import shutdown
from scripted import Script
from scripted import chunk
from scripted import json_answer
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


# --------------------------------------------------------------------------- on the wire (was test_http1.py)


@pytest.fixture
def server():
    s = Script()
    yield s
    s.close()


def _open(port: int, read_timeout: float = 5.0, client: UpstreamClient | None = None, **kw):
    client = client or UpstreamClient(read_timeout=read_timeout, **kw)
    return client, client.open(_model(Provider("s", f"http://127.0.0.1:{port}/v1", None)), b'{"model": "up"}', True)


def _read_all(resp) -> list[bytes]:
    return list(iter_raw(resp, "s"))


def test_a_content_length_body_and_the_connection_is_kept_for_the_next_call(server):
    server.answers = [[json_answer(b'{"n":1}')], [json_answer(b'{"n":2}')]]
    client, resp = _open(server.port)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert client.read_body(resp, "s") == b'{"n":1}'
    _, resp = _open(server.port, client=client)
    assert client.read_body(resp, "s") == b'{"n":2}'
    assert server.connections == 1
    assert server.requests[1].endswith(b'\r\n\r\n{"model": "up"}')


def test_chunked_events_are_relayed_one_by_one_when_they_come_apart(server):
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(3)]
    server.answers = [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunk(events[0]), 0.1,
                       chunk(events[1]), 0.1, chunk(events[2]) + b"0\r\n\r\n"]]
    _, resp = _open(server.port)
    assert _read_all(resp) == events


def test_a_chunk_split_anywhere_reads_the_same(server):
    raw = b"".join(chunk(b"event %d;" % i) for i in range(5)) + b"0\r\nX-Trailer: 1\r\n\r\n"
    cuts = range(1, len(raw), 7)
    for cut in cuts:
        server.answers.append([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + raw[:cut], 0.002,
                               raw[cut:]])
    client = UpstreamClient()
    for _ in cuts:
        _, resp = _open(server.port, client=client)
        assert client.read_body(resp, "s") == b"".join(b"event %d;" % i for i in range(5))
    assert server.connections == 1


def test_a_body_read_to_the_close_is_complete_at_the_close_and_not_kept(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n", 0.05,
                       b"data: 2\n\n", "close"], [json_answer(b"{}")]]
    client, resp = _open(server.port)
    assert _read_all(resp) == [b"data: 1\n\n", b"data: 2\n\n"]
    close(resp, True)
    _, resp = _open(server.port, client=client)
    assert client.read_body(resp, "s") == b"{}" and server.connections == 2


@pytest.mark.parametrize(("coding", "compress"), [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
])
def test_a_compressed_body_is_decoded_even_when_it_comes_in_pieces(server, coding, compress):
    plain = b"data: " + b"x" * 5000 + b"\n\n"
    packed = compress(plain)
    server.answers = [[b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
                       % (coding.encode(), len(packed)) + packed[:7], 0.05, packed[7:]]]
    client, resp = _open(server.port)
    assert client.read_body(resp, "s") == plain


def test_the_cap_counts_decoded_bytes(server):
    packed = gzip.compress(b" " * 100_000)
    server.answers = [[json_answer(packed, extra=b"Content-Encoding: gzip\r\n")]]
    client, resp = _open(server.port, max_body=50_000)
    with pytest.raises(UpstreamError, match="larger than the gateway accepts"):
        client.read_body(resp, "s")


@pytest.mark.parametrize(("answer", "match"), [
    (b"HTTP/2 200 OK\r\n\r\n", "protocol"),
    (b"HTTP/1.1 2OO OK\r\n\r\n", "protocol"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n", "protocol"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\rX-B: 2\r\nContent-Length: 2\r\n\r\n{}", "protocol"),
])
def test_a_malformed_head_is_an_upstream_error(server, answer, match):
    server.answers = [[answer, "close"]]
    with pytest.raises(UpstreamError, match=match) as info:
        _open(server.port)
    assert not isinstance(info.value, UpstreamTimeout)


@pytest.mark.parametrize("body", [b"zz\r\nab\r\n", b"2\r\nabXX", b"5\r\nab"])
def test_a_broken_chunked_body_is_an_upstream_error(server, body):
    server.answers = [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, "close"]]
    client, resp = _open(server.port)
    with pytest.raises(UpstreamError, match="broke off its answer"):
        client.read_body(resp, "s")


def test_a_connection_closed_mid_body_is_an_error_and_is_not_kept(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", "close"], [json_answer(b"{}")]]
    client, resp = _open(server.port)
    with pytest.raises(UpstreamError, match="broke off its answer"):
        client.read_body(resp, "s")
    _, resp = _open(server.port, client=client)
    assert client.read_body(resp, "s") == b"{}" and server.connections == 2


def test_a_half_read_answer_closes_its_connection(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"one"), "hold"],
                      [json_answer(b"{}")]]
    client, resp = _open(server.port)
    assert next(iter_raw(resp, "s")) == b"one"
    close(resp, False)
    close(resp, False)                               # twice is harmless
    _, resp = _open(server.port, client=client)
    assert client.read_body(resp, "s") == b"{}" and server.connections == 2


def test_shutdown_wakes_a_read_blocked_on_a_silent_provider(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"one"), "hold"]]
    _, resp = _open(server.port, read_timeout=30)
    reader = iter_raw(resp, "s")
    assert next(reader) == b"one"
    threading.Timer(0.2, shutdown, args=(resp,)).start()
    with pytest.raises(UpstreamError) as info:        # well before the 30 s read timeout
        next(reader)
    assert not isinstance(info.value, UpstreamTimeout)
    close(resp, False)
    shutdown(resp)                                   # after the close: nothing to do, no error


def test_silence_longer_than_the_read_timeout(server):
    server.answers = [["hold"], [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", "hold"]]
    with pytest.raises(UpstreamTimeout, match="did not answer in time"):
        _open(server.port, read_timeout=0.3)          # no head
    client, resp = _open(server.port, read_timeout=0.3)
    with pytest.raises(UpstreamTimeout, match="did not answer in time"):
        client.read_body(resp, "s")                  # silence mid-body


def test_an_idle_connection_the_server_closed_is_replaced_without_resending(server):
    server.answers = [[json_answer(b"{}"), 0.05, "close"], [json_answer(b'{"n":2}')]]
    client, resp = _open(server.port)
    assert client.read_body(resp, "s") == b"{}"
    time.sleep(0.3)                                  # the server closes the kept connection meanwhile
    _, resp = _open(server.port, client=client)
    assert client.read_body(resp, "s") == b'{"n":2}'
    assert server.connections == 2 and len(server.requests) == 2


def test_no_redirect_is_followed_and_no_cookie_is_kept(server):
    server.answers = [[json_answer(b"{}", status=b"302 Found", extra=b"Location: http://127.0.0.1:9/x\r\n"
                                   b"Set-Cookie: s=1; Path=/\r\n")], [json_answer(b"{}")]]
    client, resp = _open(server.port)
    assert resp.status_code == 302
    client.read_body(resp, "s")
    _, resp = _open(server.port, client=client)
    client.read_body(resp, "s")
    assert len(server.requests) == 2 and b"cookie" not in server.requests[1].lower()


def test_netrc_never_replaces_the_provider_key(server, tmp_path, monkeypatch):
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login evil password stolen\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("KEY_S", "prov-key")
    server.answers = [[json_answer(b"{}")]]
    client = UpstreamClient()
    resp = client.open(_model(Provider("s", f"http://127.0.0.1:{server.port}/v1", "KEY_S")), b"{}", False)
    client.read_body(resp, "s")
    assert b"Authorization: Bearer prov-key" in server.requests[0]


def test_refused_and_unresolvable_say_why():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(UpstreamError, match=r"refused \(refused\)"):
        _open(port)
    with pytest.raises(UpstreamError, match="name resolution"):
        UpstreamClient().open(_model(Provider("x", "http://no-such-host.invalid/v1", None)), b"{}", False)


def test_the_session_is_made_anew_in_a_forked_child(monkeypatch):
    client = UpstreamClient()
    session = client.session()
    assert client.session() is session
    monkeypatch.setattr(os, "getpid", lambda: -1)
    assert client.session() is not session
