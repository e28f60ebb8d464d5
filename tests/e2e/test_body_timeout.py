"""Request bodies have a deadline (BOUNDLESS_BODY_TIMEOUT): a body that trickles in (slowloris) gets a JSON 408
and its connection is closed, so it cannot hold a connection slot (issue 15, hole 7).

Raw sockets play the slow callers; the gateway runs under gunicorn with the shipped gunicorn.conf.py.
"""
from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from support import Gateway

TIMEOUT = 2
MSG = [{"role": "user", "content": "hello"}]
BODY = json.dumps({"model": "free-model", "messages": MSG}).encode()


def slow_post(port: int, key: str, chunked: bool = False) -> socket.socket:
    """A chat request whose headers and first body bytes are sent, the rest held back."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(BODY)
    sock.sendall(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n" + framing + b"\r\n")
    sock.sendall(b"5\r\n" + BODY[:5] + b"\r\n" if chunked else BODY[:5])
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict, bytes, bool]:
    """Status, headers and body of the one response on ``sock``, and whether the server then closed it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed before a response: {buf!r}"
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    closed = sock.recv(1) == b""
    return status, headers, body, closed


@pytest.fixture(scope="module")
def gw(tmp_path_factory, mock):
    # 2 workers x 500 connections: 1,000 slow callers would fill every slot if they could keep them.
    gateway = Gateway(tmp_path_factory.mktemp("gw-body"), mock.url,
                      env={"BOUNDLESS_BODY_TIMEOUT": str(TIMEOUT), "BOUNDLESS_WORKER_CONNECTIONS": "500"})
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture
def key(gw):
    return gw.create_key(rpm=1000, rpd=1000)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_slow_body_gets_a_json_408_and_the_connection_is_closed(gw, key, chunked):
    sock = slow_post(gw.port, key, chunked)
    try:
        # Trickle a few more bytes (a caller that is not idle), then hold the rest back. Nothing is sent near
        # the deadline: bytes the gateway has not read when it closes would turn its close into a reset.
        for i in range(5):
            time.sleep(TIMEOUT / 8)
            sock.sendall(b"1\r\n" + BODY[5 + i:6 + i] + b"\r\n" if chunked else BODY[5 + i:6 + i])
        status, headers, body, closed = read_response(sock)
    finally:
        sock.close()
    assert status == 408, body
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "request_timeout", err
    assert f"{TIMEOUT} seconds" in err["message"]
    assert closed, "the connection stays open after the 408"
    assert "Traceback" not in gw.log()


def test_whole_bodies_still_work_chunked_and_too_large(gw, key):
    client = gw.client(key)
    assert client.chat.completions.create(model="free-model", messages=MSG).choices[0].message.content
    http = requests.Session()
    http.trust_env = False
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = gw.base_url + "/chat/completions"
    # A chunked body (a generator makes requests send Transfer-Encoding: chunked), in pieces.
    resp = http.post(url, data=(BODY[i:i + 7] for i in range(0, len(BODY), 7)), headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    # Over BOUNDLESS_MAX_BODY_BYTES (10 MiB): still the gateway's 413, with a Content-Length or chunked.
    big = b"x" * (10 * 1024 * 1024 + 1)
    for data in (big, (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20))):
        resp = http.post(url, data=data, headers=headers, timeout=60)
        assert resp.status_code == 413, resp.text[:300]
        assert resp.json()["error"]["code"] == "request_too_large"


def test_1000_slow_bodies_do_not_take_the_gateway(gw, key):
    socks = []
    try:
        for _ in range(1000):
            sock = slow_post(gw.port, key)
            sock.sendall(BODY[5:6])                     # one more byte, then nothing
            socks.append(sock)
        # With all of them open, the gateway answers /healthz and a chat request (the OpenAI SDK).
        client = gw.client(key, timeout=10)
        served = None
        for _ in range(6 * TIMEOUT):                    # bounded: a few deadlines' worth of tries
            try:
                health = requests.get(gw.url + "/healthz", timeout=1)
                out = client.chat.completions.create(model="free-model", messages=MSG)
                served = (health.status_code, health.json(), out.choices[0].message.content)
                break
            except Exception:                           # a timeout while every slot is taken
                time.sleep(1)
        assert served is not None, "the gateway did not answer while 1,000 slow bodies were open"
        assert served[:2] == (200, {"status": "ok"}) and served[2], served
        # Every slow caller got its 408 and a closed connection.
        answers = [read_response(sock) for sock in socks]
        assert {(status, closed) for status, _, _, closed in answers} == {(408, True)}
    finally:
        for sock in socks:
            sock.close()
