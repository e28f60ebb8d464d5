"""app.server.onewrite: each HTTP message of both hops leaves in one write (head with the first body bytes).

The upstream side (app/upstream/http1.py) is checked at the socket: a recorder around the real socket of a real
connection to a real HTTP server counts the writes. The caller side is checked over TCP against the gateway under gunicorn: a
message written in one send() arrives whole in the client's first recv() on loopback; a head written on its
own arrives alone (the client is already blocked in recv() when it lands).
"""
from __future__ import annotations

import json
import socket
import threading

import pytest

from app.upstream import http1
from app.server import onewrite
from support import echo_server


@pytest.fixture(scope="module")
def echo():
    with echo_server() as port:
        yield port


class _Recorder:
    """The connection's socket, with every write recorded."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self.writes = sock, []

    def sendall(self, data, *args) -> None:
        self.writes.append(bytes(data))
        self._sock.sendall(data, *args)

    def send(self, data, *args) -> int:
        self.writes.append(bytes(data))
        return self._sock.send(data, *args)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_a_request_is_one_write(echo):
    pool = http1.Pool("127.0.0.1", echo, None, 5.0, 5.0, 4)
    conn, reused = pool.get()
    conn.sock = rec = _Recorder(conn.sock)
    pool.put(conn)
    for n in range(3):                          # and again on the kept-alive connection
        body = json.dumps({"n": n, "messages": [{"role": "user", "content": "hi"}]}).encode()
        rec.writes.clear()
        resp = pool.post(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % len(body), body)
        assert resp.connection is conn
        assert len(rec.writes) == 1, rec.writes
        assert rec.writes[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert rec.writes[0].endswith(b"\r\n\r\n" + body)
        got = json.loads(resp.read())
        assert resp.status == 200 and (got["method"], got["body"]) == ("POST", body.decode())
        resp.release()
    pool.clear()


# --------------------------------------------------------------------------- the caller's side, over TCP


def _first_read(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return s.recv(1 << 20)


def _chat(key: str, stream: bool) -> bytes:
    body = json.dumps({"model": "free-model", "stream": stream,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    return (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_a_json_answer_arrives_in_one_piece(gateway, key):
    for _ in range(5):
        first = _first_read(gateway.port, _chat(key, stream=False))
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), first[:200]
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        assert len(body) == length and json.loads(body)["object"] == "chat.completion"


def test_a_stream_head_arrives_with_its_first_event(gateway, key):
    """The mock waits before its first event; the head waits for it instead of going out alone."""
    for _ in range(3):
        first = _first_read(gateway.port, _chat(key, stream=True))
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, first[:300]
        assert b"data: {" in body, first


def test_a_head_request_and_an_empty_answer_still_get_their_head(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\nGET /healthz HTTP/1.1\r\nHost: gw\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 2, data


def test_send_all_is_one_send_when_the_socket_takes_it_all():
    a, b = socket.socketpair()
    rec = _Recorder(a)
    onewrite.send_all(rec, b"x" * 1000)
    assert [len(w) for w in rec.writes] == [1000]          # one send(), no sendall() after it
    assert b.recv(4096) == b"x" * 1000
    a.close()
    b.close()


def test_send_all_hands_the_rest_of_a_short_send_to_sendall():
    """A reader slower than the writer: the socket takes part of a large message; the rest waits for room."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(10)              # non-blocking underneath, as gevent's sockets are: send() may be short
    payload = bytes(range(256)) * 4096                      # 1 MiB, far beyond the socket's buffers
    got = bytearray()

    def read() -> None:
        while len(got) < len(payload):
            got.extend(b.recv(65536))

    reader = threading.Thread(target=read)
    reader.start()
    rec = _Recorder(a)
    onewrite.send_all(rec, payload)
    reader.join(10)
    assert bytes(got) == payload
    assert len(rec.writes) == 2 and len(rec.writes[0]) == len(payload)   # send() took part, sendall() the rest
    a.close()
    b.close()
