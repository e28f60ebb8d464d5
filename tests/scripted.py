"""A provider that misbehaves on purpose: a server on 127.0.0.1 that answers each request with the exact bytes
a test gives it, whole or piece by piece with real pauses, for what bench/mock_upstream.py cannot send (broken
framing, bare CRs, 101s, HTML pages, bodies over the cap)."""
from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Callable

#: One answer: byte pieces, floats (pauses, seconds), "close" (close the connection), "hold" (say nothing more).
Answer = list


class Script:
    """Reads one request per turn and plays an answer: the next of :attr:`answers`, or ``choose(request)`` (a
    function of the whole request's bytes, for a gateway whose workers call in any order)."""

    def __init__(self, choose: Callable[[bytes], Answer] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answers: list[Answer] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0
        self._choose = choose
        self._tls = tls
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}/v1"

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
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        self.closed_by_client += 1
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(buf) < length:
                    buf += sock.recv(65536)
                request = head + b"\r\n\r\n" + buf[:length]
                self.requests.append(request)
                buf = buf[length:]
                answer = self._choose(request) if self._choose else self.answers.pop(0)
                for piece in answer:
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
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.listener.close()
        for sock in self._held:
            sock.close()

    def __enter__(self) -> "Script":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def json_answer(body: bytes, extra: bytes = b"", status: bytes = b"200 OK",
                content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status, content_type, extra, len(body), body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


COMPLETION = (b'{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
              b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}')
