"""Tests for the fake upstream in bench/mock_upstream.py (run as a real subprocess)."""
from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from bench.mock_upstream import MockUpstream

GAP = 0.05
CHUNKS = 5
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hello there world"}]},
]
PROMPT_TOKENS = 2 + 4 + 3 + 4


@pytest.fixture(scope="module")
def upstream():
    with MockUpstream(chunks=CHUNKS, gap=GAP) as upstream:
        yield upstream


@pytest.fixture
def http(upstream):
    upstream.reset()
    with requests.Session() as session:
        session.trust_env = False  # never route 127.0.0.1 through a proxy
        yield session


def chat(http, upstream, **body):
    return http.post(f"{upstream.url}/chat/completions", json={"model": "m", "messages": MESSAGES, **body},
                     stream=bool(body.get("stream")), timeout=5)


def read_events(resp) -> list[tuple[float, str]]:
    """(arrival time, data) of each SSE event, read as bytes arrive."""
    events, buffer = [], b""
    while chunk := resp.raw.read1(65536):
        now = time.monotonic()
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append((now, event.decode().removeprefix("data: ")))
    return events


def test_non_stream_answer_and_usage(http, upstream):
    resp = chat(http, upstream, mock={"echo_headers": True, "set_cookie": True})
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"] == f"chatcmpl-mock-{upstream.last()['id']}"
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4"}
    assert body["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CHUNKS,
                             "total_tokens": PROMPT_TOKENS + CHUNKS}
    assert body["echo_headers"]["content-type"] == "application/json"
    assert resp.cookies["mock_session"] == "abc"
    record = upstream.last()
    assert record["body"]["messages"] == MESSAGES and record["completed"] and not record["stream"]
    body = chat(http, upstream, mock={"content": "hi  there you"}).json()
    assert body["choices"][0]["message"]["content"] == "hi  there you" and body["usage"]["completion_tokens"] == 3
    assert "usage" not in chat(http, upstream, mock={"no_usage": True}).json()


def test_stream_events_are_spaced_by_gap(http, upstream):
    resp = chat(http, upstream, stream=True)
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["transfer-encoding"] == "chunked"
    events = read_events(resp)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "tok0 tok1 tok2 tok3 tok4"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all("usage" not in c for c in chunks)
    times = [t for t, _ in events[1:1 + CHUNKS]]
    spacings = sorted(b - a for a, b in zip(times, times[1:]))
    assert times[-1] - times[0] >= (CHUNKS - 1) * GAP * 0.9  # the server never sends early...
    assert spacings[len(spacings) // 2] >= GAP * 0.6  # ...and events arrive one by one, not in a burst
    assert upstream.wait_for(lambda r: r["completed"] and r["chunks_sent"] == CHUNKS, timeout=2)


def test_stream_include_usage(http, upstream):
    resp = chat(http, upstream, stream=True, stream_options={"include_usage": True}, mock={"gap": 0})
    chunks = [json.loads(data) for _, data in read_events(resp)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CHUNKS,
                                   "total_tokens": PROMPT_TOKENS + CHUNKS}
    resp = chat(http, upstream, stream=True, stream_options={"include_usage": True}, mock={"gap": 0, "no_usage": True})
    assert all(json.loads(d)["choices"] for _, d in read_events(resp)[:-1])


def test_content_knob_and_split_utf8(http, upstream):
    resp = chat(http, upstream, stream=True, mock={"content": "héllo 🎉 world", "split_utf8": True, "gap": 0})
    pieces = [json.loads(d)["choices"][0]["delta"].get("content") for _, d in read_events(resp)[:-1]]
    assert pieces[1:-1] == ["héllo", " 🎉", " world"]
    assert chat(http, upstream, mock={"content": "abcdef", "chunks": 3}).json()["usage"]["completion_tokens"] == 3


def test_status_and_raw_knobs(http, upstream):
    resp = chat(http, upstream, mock={"status": 429})
    assert resp.status_code == 429
    assert resp.json() == {"error": {"message": "mock error", "type": "server_error", "param": None, "code": None}}
    resp = chat(http, upstream, stream=True, mock={"status": 400, "error": {"message": "bad", "code": "x"}})
    assert resp.status_code == 400 and resp.json() == {"error": {"message": "bad", "code": "x"}}
    resp = chat(http, upstream, mock={"raw_status": 502, "raw_body": "<html>bad gateway</html>",
                                  "raw_content_type": "text/html"})
    assert (resp.status_code, resp.text, resp.headers["content-type"]) == (502, "<html>bad gateway</html>", "text/html")


def test_cut_after_breaks_the_response(http, upstream):
    resp = chat(http, upstream, stream=True, mock={"cut_after": 2, "gap": 0})
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in resp.iter_content(None):
            pass
    record = upstream.last()
    assert record["chunks_sent"] == 2 and not record["completed"]
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        chat(http, upstream, mock={"cut_after": 0})


def test_client_closed_is_recorded(upstream):
    upstream.reset()
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True, "mock": {"chunks": 100}}).encode()
    with socket.create_connection(("127.0.0.1", upstream.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        assert b"200 OK" in sock.recv(65536)
    closed_at = time.time()
    record = upstream.wait_for(lambda r: r["client_closed"], timeout=2)
    assert record is not None and not record["completed"] and record["chunks_sent"] < 100
    assert closed_at - 0.01 <= record["closed_at"] <= closed_at + 0.5


def test_keep_alive_and_other_endpoints(http, upstream):
    for stream in (True, False, True):
        resp = chat(http, upstream, stream=stream, mock={"gap": 0})
        assert resp.status_code == 200 and resp.content.endswith(b"[DONE]\n\n" if stream else b"}")
    assert http.get(f"{upstream.url}/models").json()["data"][0]["id"] == "mock-model"
    assert http.get(f"{upstream.url}/nope").status_code == 404
    pools = http.get_adapter(upstream.url).poolmanager.pools
    assert [pools[key].num_connections for key in pools.keys()] == [1]  # one TCP connection served all
    assert len(upstream.requests()) == 3


def test_chunked_request_body(http, upstream):
    payload = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    resp = http.post(f"{upstream.url}/chat/completions", data=iter([payload[:10], payload[10:]]),
                     headers={"Content-Type": "application/json"}, timeout=5)
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == PROMPT_TOKENS
    record = upstream.last()
    assert record["headers"]["transfer-encoding"] == "chunked" and record["body"]["messages"] == MESSAGES


def test_no_record():
    with MockUpstream(record=False) as upstream, requests.Session() as session:
        session.trust_env = False
        session.post(f"{upstream.url}/chat/completions", json={"messages": []}, timeout=5).raise_for_status()
        assert upstream.requests() == []
