"""app.upstream.http1 against real sockets: a scripted server on 127.0.0.1 answers each request with the bytes a test
gives it (whole, or piece by piece with real pauses), so framing, keep-alive, timeouts and errors are checked
on the wire, as the gateway meets them."""
from __future__ import annotations

import gzip
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import zlib

import pytest

from app.upstream import http1

BODY = b'{"id":"x","choices":[]}'


def _request(body: bytes = BODY) -> tuple[bytes, bytes]:
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body), body


class Script:
    """A server that reads one request per turn and plays the test's answer for it: a list of byte pieces,
    floats (pauses, seconds), ``"close"`` (close the connection) or ``"hold"`` (keep it open, say nothing)."""

    def __init__(self, wrap=None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answers: list[list] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self._wrap = wrap
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(sock,), daemon=True).start()

    def _connection(self, sock: socket.socket) -> None:
        try:
            if self._wrap is not None:
                sock = self._wrap(sock)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(buf) < length:
                    buf += sock.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                for piece in self.answers.pop(0):
                    if isinstance(piece, float):
                        time.sleep(piece)
                    elif piece == "close":
                        sock.close()
                        return
                    elif piece == "hold":
                        self._held.append(sock)
                        return
                    else:
                        sock.sendall(piece)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for sock in self._held:
            sock.close()


@pytest.fixture
def server():
    s = Script()
    yield s
    s.close()


def _pool(port: int, read_timeout: float = 5.0, tls=None, host: str = "127.0.0.1") -> http1.Pool:
    return http1.Pool(host, port, tls, 2.0, read_timeout, 8)


def _json(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra, len(body), body)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _read_all(resp: http1.Response) -> list[bytes]:
    pieces = []
    while data := resp.read1():
        pieces.append(data)
    return pieces


# --------------------------------------------------------------------------- framing


def test_a_content_length_body_and_the_connection_is_kept_for_the_next_call(server):
    server.answers = [[_json(BODY)], [_json(b'{"n":2}')]]
    pool = _pool(server.port)
    resp = pool.post(*_request())
    assert (resp.status, resp.reason, resp.headers.get("Content-Type")) == (200, "OK", "application/json")
    assert resp.headers["content-type"] == "application/json" and "CONTENT-TYPE" in resp.headers
    assert resp.read() == BODY and resp.complete
    first = resp.connection
    resp.release()
    resp = pool.post(*_request(b'{"second": true}'))
    assert resp.connection is first and resp.read() == b'{"n":2}'
    resp.release()
    assert server.connections == 1
    assert server.requests[1].endswith(b'\r\n\r\n{"second": true}')


def test_a_body_that_arrives_in_pieces_is_read_as_it_arrives(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", 0.2, b"56789"]]
    resp = _pool(server.port).post(*_request())
    t0 = time.monotonic()
    assert resp.read1() == b"01234" and time.monotonic() - t0 < 0.15
    assert resp.read1() == b"56789" and resp.read1() == b""


def test_chunked_events_are_relayed_one_by_one_when_they_come_apart(server):
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(3)]
    server.answers = [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", _chunk(events[0]), 0.1,
                       _chunk(events[1]), 0.1, _chunk(events[2]) + b"0\r\n\r\n"]]
    resp = _pool(server.port).post(*_request())
    assert _read_all(resp) == events
    assert resp.complete


def test_chunks_that_come_together_are_read_at_once_and_trailers_are_skipped(server):
    pieces = [b"ab", b"cde", b"f" * 300]
    server.answers = [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"".join(_chunk(p) for p in pieces[:2]) + b"12C;ext=1\r\n" + pieces[2] + b"\r\n"
                       + b"0\r\nX-Trailer: y\r\n\r\n"], [_json(b"{}")]]
    pool = _pool(server.port)
    resp = pool.post(*_request())
    assert _read_all(resp) == [b"".join(pieces)]
    resp.release()
    resp = pool.post(*_request())                   # nothing of the first answer is left on the connection
    assert resp.read() == b"{}" and server.connections == 1


def test_a_chunk_split_anywhere_reads_the_same(server):
    raw = b"".join(_chunk(b"event %d;" % i) for i in range(5)) + b"0\r\n\r\n"
    for cut in range(1, len(raw)):
        server.answers.append([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + raw[:cut], 0.002,
                               raw[cut:]])
    pool = _pool(server.port)
    for _ in range(1, len(raw)):
        resp = pool.post(*_request())
        assert resp.read() == b"".join(b"event %d;" % i for i in range(5))
        resp.release()
    assert server.connections == 1


def test_a_body_read_to_the_close_is_complete_at_the_close_and_not_kept(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n", 0.05,
                       b"data: 2\n\n", "close"], [_json(b"{}")]]
    pool = _pool(server.port)
    resp = pool.post(*_request())
    assert _read_all(resp) == [b"data: 1\n\n", b"data: 2\n\n"] and resp.complete
    resp.release()
    assert pool.post(*_request()).read() == b"{}" and server.connections == 2


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
])
def test_an_empty_body(server, answer):
    server.answers = [[answer], [_json(b"{}")]]
    pool = _pool(server.port)
    resp = pool.post(*_request())
    assert resp.read1() == b"" and resp.complete
    resp.release()
    assert pool.post(*_request()).read() == b"{}" and server.connections == 1


def test_informational_answers_are_skipped(server):
    server.answers = [[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                       + _json(BODY)]]
    resp = _pool(server.port).post(*_request())
    assert resp.status == 200 and resp.read() == BODY


def test_header_fields_repeated_folded_and_lf_only(server):
    server.answers = [[b"HTTP/1.1 429 Too Many Requests\nRetry-After: 3\nX-A: 1\nx-a: 2\nX-Long: one\n two\n"
                       b"Content-Length: 2\n\n{}"]]
    resp = _pool(server.port).post(*_request())
    assert resp.status == 429 and resp.reason == "Too Many Requests"
    assert resp.headers.get("retry-after") == "3" and resp.headers.get("X-A") == "1, 2"
    assert resp.headers.get("x-long") == "one two" and resp.read() == b"{}"


def test_connection_close_and_http_1_0_answers_are_not_kept(server):
    server.answers = [[_json(b"{}", b"Connection: close\r\n")], [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"],
                      [_json(b"{}")]]
    pool = _pool(server.port)
    for _ in range(3):
        resp = pool.post(*_request())
        assert resp.read() == b"{}"
        resp.release()
    assert server.connections == 3


@pytest.mark.parametrize("coding, compress", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", lambda data: zlib.compress(data)[2:-4]),        # raw deflate, as some servers send it
])
def test_a_compressed_body_is_decoded_even_when_it_comes_in_pieces(server, coding, compress):
    plain = b"data: " + b"x" * 5000 + b"\n\n"
    packed = compress(plain)
    server.answers = [[b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
                       % (coding.encode(), len(packed)) + packed[:7], 0.05, packed[7:]]]
    resp = _pool(server.port).post(*_request())
    assert b"".join(_read_all(resp)) == plain


def test_an_encoding_it_cannot_read_is_an_error(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nxx"]]
    resp = _pool(server.port).post(*_request())
    with pytest.raises(http1.ProtocolError, match="Content-Encoding"):
        resp.read1()
    assert resp.read1(decode_content=False) == b"xx"


# --------------------------------------------------------------------------- broken answers


@pytest.mark.parametrize("answer, match", [
    (b"HTTP/2 200 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 2OO OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "header field"),
    (b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n", "header field"),
    (b"HTTP/1.1 200 OK\r\n X-A: 1\r\n\r\n", "whitespace"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
])
def test_a_malformed_head_is_a_protocol_error(server, answer, match):
    server.answers = [[answer, "close"]]
    with pytest.raises(http1.ProtocolError, match=match):
        _pool(server.port).post(*_request())


@pytest.mark.parametrize("body, match", [
    (b"zz\r\nab\r\n", "chunk size"),
    (b"2\r\nabXX", "CRLF"),
    (b"5\r\nab", "closed"),
])
def test_a_broken_chunked_body_is_a_protocol_error(server, body, match):
    server.answers = [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, "close"]]
    resp = _pool(server.port).post(*_request())
    with pytest.raises(http1.ProtocolError, match=match):
        resp.read()


def test_a_connection_closed_mid_body_is_a_protocol_error_and_is_not_kept(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", "close"], [_json(b"{}")]]
    pool = _pool(server.port)
    resp = pool.post(*_request())
    assert resp.read1() == b"partial"
    with pytest.raises(http1.ProtocolError, match="closed"):
        resp.read1()
    resp.release()
    assert pool.post(*_request()).read() == b"{}" and server.connections == 2


def test_no_answer_at_all_is_a_protocol_error(server):
    server.answers = [["close"]]
    with pytest.raises(http1.ProtocolError, match="without answering"):
        _pool(server.port).post(*_request())


def test_a_half_read_answer_closes_its_connection(server):
    server.answers = [[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunk(b"one"), "hold"],
                      [_json(b"{}")]]
    pool = _pool(server.port)
    resp = pool.post(*_request())
    assert resp.read1() == b"one"
    sock = resp.sock
    resp.release()                                   # asked to keep it, but the answer is not over
    assert sock.fileno() == -1 and resp.sock is None
    resp.release()                                   # twice is harmless
    assert pool.post(*_request()).read() == b"{}" and server.connections == 2


# --------------------------------------------------------------------------- timeouts and connections


def test_silence_longer_than_the_read_timeout(server):
    server.answers = [["hold"], [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", "hold"]]
    pool = _pool(server.port, read_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(http1.ReadTimedOut):
        pool.post(*_request())                       # no head
    assert 0.25 < time.monotonic() - t0 < 2
    resp = pool.post(*_request())
    assert resp.read1() == b"ab"
    with pytest.raises(http1.ReadTimedOut):
        resp.read1()                                 # silence mid-body


def test_an_idle_connection_the_server_closed_is_replaced_without_resending(server):
    server.answers = [[_json(b"{}"), 0.05, "close"], [_json(b'{"n":2}')]]
    pool = _pool(server.port)
    resp = pool.post(*_request())
    assert resp.read() == b"{}"
    resp.release()
    time.sleep(0.3)                                  # the server closes the kept connection meanwhile
    resp = pool.post(*_request())
    assert resp.read() == b'{"n":2}'
    assert server.connections == 2 and len(server.requests) == 2


def test_a_refused_connection_is_tried_three_times_then_fails():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]                    # a port nobody listens on once closed
    pool = _pool(port)
    t0 = time.monotonic()
    with pytest.raises(http1.ConnectFailed):
        pool.post(*_request())
    assert time.monotonic() - t0 >= 0.2              # at once, then after 0.2 s


def test_an_unresolvable_host_fails_to_connect():
    with pytest.raises(http1.ConnectFailed):
        _pool(80, host="no-such-host.invalid").post(*_request(), retries=0)


def test_a_connect_that_never_completes_times_out():
    with socket.create_server(("127.0.0.1", 0), backlog=0) as s:
        port = s.getsockname()[1]
        fillers = []
        try:                                         # fill the accept queue: further SYNs go unanswered
            for _ in range(8):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
                fillers.append(c)
            time.sleep(0.1)
            pool = http1.Pool("127.0.0.1", port, None, 0.3, 5.0, 8)
            with pytest.raises((http1.ConnectTimedOut, http1.ProtocolError)):
                pool.post(*_request(), retries=0)
        finally:
            for c in fillers:
                c.close()


def test_the_client_forgets_its_pools_in_a_forked_child(server, monkeypatch):
    client = http1.Client(2.0, 5.0, 8)
    pool = client.pool("http", "127.0.0.1", server.port)
    assert client.pool("http", "127.0.0.1", server.port) is pool
    monkeypatch.setattr(http1.os, "getpid", lambda: -1)
    assert client.pool("http", "127.0.0.1", server.port) is not pool


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_https_verifies_the_server_and_keeps_the_connection(certificate):
    cert, key = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    tls_server = Script(wrap=lambda sock: server_ctx.wrap_socket(sock, server_side=True))
    try:
        tls_server.answers = [[_json(BODY)], [_json(b"{}")]]
        trusting = ssl.create_default_context(cafile=str(cert))
        pool = _pool(tls_server.port, tls=trusting, host="localhost")
        for expected in (BODY, b"{}"):
            resp = pool.post(*_request())
            assert isinstance(resp.sock, ssl.SSLSocket) and resp.read() == expected
            resp.release()
        assert tls_server.connections == 1
        untrusting = http1.Client(2.0, 5.0, 8)._tls_context()        # certifi's bundle: not our own CA
        with pytest.raises(http1.ConnectFailed, match="certificate"):
            _pool(tls_server.port, tls=untrusting, host="localhost").post(*_request(), retries=0)
    finally:
        tls_server.close()


# --------------------------------------------------------------------------- framing, fuzzed


class _Pieces(http1.Connection):
    """A connection whose reads return the given pieces, then EOF: every way the bytes can be split."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__(None)
        self.pieces = pieces

    def recv(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


class _NoPool:
    def put(self, conn) -> None:
        pass


def test_any_split_of_any_chunked_body_reads_the_same():
    import random
    rng = random.Random(6)
    for case in range(3000):
        data = [bytes(rng.choice(b"ab\r\n;0") for _ in range(rng.randint(1, 40))) for _ in range(rng.randint(0, 6))]
        raw = (b"".join(b"%x%s\r\n%s\r\n" % (len(d), rng.choice([b"", b";ext=1"]), d) for d in data)
               + b"0\r\n" + rng.choice([b"", b"Trailer: 1\r\n"]) + b"\r\n")
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(0, 12))))
        conn = _Pieces([raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])])
        headers = http1.Headers(**{"transfer-encoding": "chunked"})
        resp = http1.Response(_NoPool(), conn, 11, 200, "OK", headers)
        n = rng.choice([65536, 1, 3, 7])
        out = []
        while piece := resp.read1(n):
            assert len(piece) <= n
            out.append(piece)
        assert b"".join(out) == b"".join(data), case
        assert resp.complete and conn.buf == b"" and conn.pieces == [], case


def test_a_kept_connection_on_a_descriptor_above_1024_is_still_reused(server):
    """A busy worker (1,000 open streams) has descriptors beyond select()'s limit: the idle check must work
    there too, or every call would open a new connection."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip("needs a descriptor limit above 2,100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    try:
        server.answers = [[_json(b"{}")], [_json(b'{"n":2}')]]
        pool = _pool(server.port)
        conn, _ = pool.get()
        high = socket.socket(fileno=os.dup2(conn.sock.fileno(), 2000))
        conn.sock.close()
        conn.sock = high
        high.settimeout(5.0)
        pool.put(conn)
        for expected in (b"{}", b'{"n":2}'):
            resp = pool.post(*_request())
            assert resp.connection is conn and resp.read() == expected
            resp.release()
        assert server.connections == 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
