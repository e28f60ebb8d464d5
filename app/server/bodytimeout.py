"""
app.server.bodytimeout
~~~~~~~~~~~~~~~~~~~~~~

A deadline on receiving a request body (``BOUNDLESS_BODY_TIMEOUT``, 30 s).

gunicorn reads a body only as fast as the caller sends it, and has no limit of its own on how long that takes:
a caller that trickles its body a byte at a time (slowloris) holds one of the worker's connection slots for as
long as it likes, and enough of them hold them all. This WSGI middleware reads the whole body before Flask
sees it, within the deadline; when the deadline passes the caller gets an OpenAI-shaped ``408 request_timeout``
and the connection is closed, which frees the slot.

Under gevent (the shipped worker class) the deadline is a ``gevent.Timeout`` around the whole read. Under
threads it is the socket's timeout, set to the time left before each read: a stalled body is cut at the
deadline, but one that trickles bytes steadily can stretch a read beyond it; nginx (config/nginx.conf) buffers
bodies before they reach the gateway and keeps such callers away altogether.

A body larger than ``BOUNDLESS_MAX_BODY_BYTES`` is not read: Flask refuses it with 413 as before (a chunked one is
read to one byte past the limit, then refused). Once read, the body is handed on with a ``Content-Length``, so
chunked request bodies work as before.
"""
from __future__ import annotations

import io
import logging
import socket
import time

from flask import Flask

from ..errors import RequestTimeout

log = logging.getLogger("boundless")

#: Bytes asked of the server per read.
READ_SIZE = 65536


class BodyTimedOut(Exception):
    """The body did not arrive within the deadline."""


class BodyDeadline:
    """WSGI middleware: read the request body within ``timeout`` seconds, or answer 408 and close."""

    def __init__(self, wsgi_app, timeout: float, max_bytes: int) -> None:
        self.app = wsgi_app
        self.timeout = timeout
        self.max_bytes = max_bytes

    def __call__(self, environ, start_response):
        length = _content_length(environ)
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if self.timeout <= 0 or (not chunked and not length) or (length or 0) > self.max_bytes:
            return self.app(environ, start_response)     # no body to wait for, or one Flask refuses unread
        limit = self.max_bytes + 1 if chunked else length
        try:
            body = self._read(environ, limit)
        except BodyTimedOut:
            log.warning("request body from %s not received within %gs: 408",
                        environ.get("REMOTE_ADDR", "?"), self.timeout)
            err = RequestTimeout(f"The request body was not received within {self.timeout:g} seconds.",
                                 headers={"Connection": "close"})
            return err.response()(environ, start_response)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)      # the body is now a plain one of that length
        return self.app(environ, start_response)

    def _read(self, environ, limit: int) -> bytes:
        stream = environ["wsgi.input"]
        if _gevent_active():
            from gevent import Timeout
            with Timeout(self.timeout, BodyTimedOut):
                return _read_upto(stream, limit)
        sock = environ.get("gunicorn.socket")
        if sock is None:                                 # not under gunicorn (e.g. Flask's test client)
            return _read_upto(stream, limit)
        deadline = time.monotonic() + self.timeout
        previous = sock.gettimeout()
        try:
            return _read_upto(stream, limit, lambda: sock.settimeout(_left(deadline)))
        except (socket.timeout, TimeoutError) as err:
            raise BodyTimedOut() from err
        finally:
            try:
                sock.settimeout(previous)
            except OSError:                               # the caller went away meanwhile
                pass


def _read_upto(stream, limit: int, before_read=None) -> bytes:
    """Read until ``limit`` bytes or the end of the body."""
    parts, got = [], 0
    while got < limit:
        if before_read:
            before_read()
        data = stream.read(min(READ_SIZE, limit - got))
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise BodyTimedOut()
    return left


def _content_length(environ) -> int | None:
    try:
        return max(0, int(environ.get("CONTENT_LENGTH") or 0))
    except ValueError:
        return None


def _gevent_active() -> bool:
    """True in a gevent worker (gunicorn patches the socket module there before loading the app)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def init_app(app: Flask) -> None:
    app.wsgi_app = BodyDeadline(app.wsgi_app, float(app.config["BOUNDLESS_BODY_TIMEOUT"]),
                                int(app.config["BOUNDLESS_MAX_BODY_BYTES"]))
