"""
app.upstream.client
~~~~~~~~~~~~~~~~~~~

The client side of the gateway: calls to providers through app/upstream/http1.py's keep-alive pools (one per origin,
per worker process), and the translation of every transport failure into the gateway's errors (no
``app.http1`` error leaves this module).

The client keeps no cookies (a provider's cookie must never travel with another caller's request), ignores
proxy variables and ``.netrc``, follows no redirect, and retries only failed *connections*, never a request
that reached the provider. Timeouts are ``(connect, read)``: the read timeout is the longest silence between
two reads, not a limit on a whole stream. Bodies are read with ``read1`` so each event is relayed the moment
it arrives, whatever the upstream's framing.

A connection goes back to its pool (kept alive for the next request) only after its answer was read to the
end; an answer abandoned half-way (the caller hung up, a cut) closes it, so the provider stops generating.
"""
from __future__ import annotations

import logging
import socket
from typing import Iterator
from urllib.parse import urlsplit

from . import http1
from ..catalog import Model
from ..catalog import Provider
from ..errors import UpstreamError
from ..errors import UpstreamTimeout

log = logging.getLogger("boundless")

#: What the gateway holds of an upstream answer: its status and headers, body not yet read.
Response = http1.Response


class UpstreamClient:
    """Opens requests to providers; safe to share between the threads (or greenlets) of one process."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float = 300.0, pool_size: int = 1024) -> None:
        # pool_size: idle keep-alive connections kept per provider; more in flight are opened, then closed.
        self._http = http1.Client(connect_timeout, read_timeout, pool_size)
        #: (provider name, stream, provider key) -> (origin, the request head up to the Content-Length value);
        #: the name, not the URL: two providers may share a URL and differ in their headers.
        self._heads: dict[tuple, tuple[tuple[str, str, int], bytes]] = {}

    def _head(self, provider: Provider, stream: bool, key: str | None) -> tuple[tuple[str, str, int], bytes]:
        found = self._heads.get((provider.name, stream, key))
        if found is None:
            found = self._heads[(provider.name, stream, key)] = _request_head(provider, stream, key)
        return found

    def open(self, model: Model, payload: bytes, stream: bool) -> Response:
        """POST ``payload`` to the model's provider; return the response with its body not yet read.

        :raise UpstreamTimeout: no connection or no response headers in time.
        :raise UpstreamError: the provider refused the connection or broke the protocol.
        """
        provider = model.provider
        origin, head = self._head(provider, stream, provider.api_key())
        try:
            return self._http.pool(*origin).post(b"%s%d\r\n\r\n" % (head, len(payload)), payload)
        except (http1.ConnectTimedOut, http1.ReadTimedOut) as err:
            raise UpstreamTimeout(f"The provider {provider.name!r} did not answer in time.") from err
        except http1.HTTPError as err:
            log.warning("upstream %s unreachable: %s", provider.name, type(err).__name__)
            raise UpstreamError(f"The provider {provider.name!r} could not be reached.") from err


def _request_head(provider: Provider, stream: bool, key: str | None) -> tuple[tuple[str, str, int], bytes]:
    """The origin of the provider's chat URL and the head of a request to it, up to its Content-Length value."""
    url = urlsplit(provider.chat_url)
    scheme = url.scheme.lower()
    if scheme not in ("http", "https") or not url.hostname:
        raise UpstreamError(f"The provider {provider.name!r} has an unusable URL.")
    port = url.port or (443 if scheme == "https" else 80)
    host = url.netloc.rpartition("@")[2]
    if (scheme, port) in (("http", 80), ("https", 443)):
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = {"Host": host, "Content-Type": "application/json", "Accept-Encoding": "identity",
               "Accept": "text/event-stream" if stream else "application/json",
               "User-Agent": "boundless/0.1", **provider.headers}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    lines = [f"POST {target} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers.items()]
    for line in lines:
        if "\r" in line or "\n" in line or "\0" in line:      # a header value that would split the request
            raise UpstreamError(f"The provider {provider.name!r} has an invalid header or URL.")
    head = "\r\n".join(lines) + "\r\nContent-Length: "
    return (scheme, url.hostname, port), head.encode("latin-1")


def read_body(resp: Response, provider: str) -> bytes:
    """Read a whole (non-stream) body, translating transport errors."""
    complete = False
    try:
        data = b"".join(iter_raw(resp, provider))
        complete = True
        return data
    finally:
        close(resp, complete)


def iter_raw(resp: Response, provider: str) -> Iterator[bytes]:
    """Yield the body's bytes as they arrive (decoded if the provider compressed anyway)."""
    try:
        while data := resp.read1():
            yield data
    except http1.ReadTimedOut as err:
        raise UpstreamTimeout(f"The provider {provider!r} went silent for too long.") from err
    except http1.HTTPError as err:
        raise UpstreamError(f"The connection to the provider {provider!r} broke mid-answer.") from err


def close(resp: Response, complete: bool) -> None:
    """Done with an answer: keep its connection for the next request if it was read to the end (and the
    provider did not ask to close it), else close the connection."""
    resp.release(reuse=complete)


def shutdown(resp: Response) -> None:
    """Shut the answer's socket down from another thread: a relay blocked reading it wakes up at once."""
    sock = resp.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:               # already closed
            pass
