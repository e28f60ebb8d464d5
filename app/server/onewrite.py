"""
app.server.onewrite
~~~~~~~~~~~~~~~~~~~

One write per small HTTP message: the head goes out with the first bytes of the body, on both of the
gateway's hops.

Out of the box, gunicorn writes a response in two ``send()`` calls: the head, then the body. On loopback or
a LAN every ``send()`` is a TCP segment that the kernel carries through the whole receive path and a wake-up
of the reader, in the sender's CPU time: in the JSON profile (docs/benchmarks.md) ``send`` was a fifth of the
gateway's CPU, two of its four calls per request avoidable. Here each hop holds its head and writes it
together with the first body bytes.

* The upstream side: app/upstream/http1.py writes each request (head and body) with one :func:`send_all`.
* :class:`Response`: gunicorn's response writer, installed in each worker by :func:`install` (from
  ``post_worker_init``); gunicorn builds every response through the module attribute
  ``gunicorn.http.wsgi.Response``. A JSON answer leaves in one write; a stream's head leaves with its
  first event.

Nothing is delayed: a head is held only until the next write of the same message, which follows at once (a
body that is not there yet — a stream waiting for its first event — is exactly when the caller has nothing to
read either), and a message that ends without body bytes sends its head when it closes.
"""
from __future__ import annotations


def _response_class():
    from gunicorn.http import wsgi

    class Response(wsgi.Response):
        """gunicorn's response with the head held until the first body bytes (or the end of the message)."""

        _head: bytes | None = None

        def send_headers(self) -> None:
            if self.headers_sent:
                return
            sock, self.sock = self.sock, _Capture()
            try:
                super().send_headers()              # gunicorn builds and "writes" the head: we keep it
            finally:
                self._head, self.sock = b"".join(self.sock.parts), sock

        def _emit_body(self, data: bytes) -> None:
            head, self._head = self._head, None
            if self.chunked:
                data = b"%X\r\n%b\r\n" % (len(data), data)
            send_all(self.sock, data if head is None else head + data)

        def can_sendfile(self) -> bool:
            return False          # sendfile() writes the socket itself after send_headers(): keep write()

        def close(self) -> None:
            """gunicorn's ``close()`` (the head if not sent, then a chunked body's last chunk), in one write."""
            if not self.headers_sent:
                self.send_headers()
            head, self._head = self._head, None
            out = (head or b"") + (b"0\r\n\r\n" if self.chunked else b"")
            if out:
                send_all(self.sock, out)

    return Response


def send_all(sock, data: bytes) -> None:
    """``sock.sendall(data)``, but one ``send()`` when the socket takes it all, as it nearly always does.

    gevent's ``sendall`` asks the kernel for the socket's buffer size (``getsockopt``) on every call, to split
    large writes: a second system call per HTTP message, and per event of a stream. A short send (a full
    buffer: a slow reader) hands the rest to ``sendall``, which waits for room as usual.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


class _Capture:
    """Stands in for the socket while gunicorn writes a head."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.parts.append(bytes(data))


_installed = None


def install():
    """Make gunicorn build this process's responses with the one-write :class:`Response` (idempotent)."""
    global _installed
    from gunicorn.http import wsgi
    if _installed is None:
        _installed = _response_class()
    wsgi.Response = _installed
    return _installed
