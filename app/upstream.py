"""
app.upstream
~~~~~~~~~~~~

The client side of the gateway: urllib3 connection pools (one per provider, per worker process), and the
translation of every transport failure into the gateway's errors (no ``urllib3`` exception leaves this module).

urllib3 rather than ``requests`` on top of it: on this path ``requests`` added about 0.3 ms of CPU per call
(preparing and merging settings, cookie jars, hooks, runtime ``Protocol`` checks) and offered nothing the
gateway uses; see docs/benchmarks.md. Like the session it replaces, the client keeps no cookies (a provider's
cookie must never travel with another caller's request), ignores proxy variables and ``.netrc``, follows no
redirect, and retries only failed *connections*, never a request that reached the provider. Timeouts are
``(connect, read)``: the read timeout is the longest silence between two bytes, not a limit on a whole stream.
Bodies are read with ``read1`` so each event is relayed the moment it arrives, whatever the upstream's framing.

A connection goes back to its pool (kept alive for the next request) only after its answer was read to the
end; an answer abandoned half-way (the caller hung up, a cut) closes it, so the provider stops generating.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Iterator

import urllib3
from urllib3.exceptions import HTTPError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

from . import onewrite
from .catalog import Model
from .errors import UpstreamError
from .errors import UpstreamTimeout

log = logging.getLogger("boundless")

_READ_SIZE = 65536

#: What the gateway holds of an upstream answer: urllib3's response, body not yet read.
Response = urllib3.BaseHTTPResponse

#: Reconnect twice on a failed *connection*; never resend a request that reached the provider.
_RETRY = Retry(total=2, connect=2, read=0, status=0, redirect=0, other=0, backoff_factor=0.1,
               raise_on_status=False, raise_on_redirect=False)


def _ca_certs() -> str | None:
    """The CA bundle ``requests`` would use (certifi), so HTTPS providers are trusted exactly as before."""
    try:
        import certifi
    except ImportError:          # the system's store, through ssl's default context
        return None
    return certifi.where()


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = onewrite.HTTPConnection       # head and body in one write


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = onewrite.HTTPSConnection


class UpstreamClient:
    """Opens requests to providers; safe to share between the threads (or greenlets) of one process."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float = 300.0, pool_size: int = 1024) -> None:
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        #: Idle keep-alive connections kept per provider; more in flight than this are opened and then closed.
        self.pool_size = pool_size
        self._manager: urllib3.PoolManager | None = None
        self._pools: dict[str, tuple[urllib3.HTTPConnectionPool, str]] = {}
        self._pid = 0
        self._lock = threading.Lock()

    def _pool(self, url: str) -> tuple[urllib3.HTTPConnectionPool, str]:
        """The pool for ``url``'s origin and the request target, made once per process and URL."""
        if self._pid != os.getpid():          # never use sockets inherited across a fork
            with self._lock:
                if self._pid != os.getpid():
                    self._manager = urllib3.PoolManager(num_pools=64, maxsize=self.pool_size, block=False,
                                                        ca_certs=_ca_certs())
                    self._manager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
                    self._pools, self._pid = {}, os.getpid()
        found = self._pools.get(url)
        if found is None:
            parsed = urllib3.util.parse_url(url)
            found = self._pools[url] = (self._manager.connection_from_url(url), parsed.request_uri)
        return found

    def open(self, model: Model, payload: bytes, stream: bool) -> Response:
        """POST ``payload`` to the model's provider; return the response with its body not yet read.

        :raise UpstreamTimeout: no connection or no response headers in time.
        :raise UpstreamError: the provider refused the connection or broke the protocol.
        """
        provider = model.provider
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                   "Accept": "text/event-stream" if stream else "application/json",
                   "User-Agent": "boundless/0.1", **provider.headers}
        key = provider.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        pool, target = self._pool(provider.chat_url)
        try:
            return pool.urlopen("POST", target, body=payload, headers=headers, retries=_RETRY, redirect=False,
                                timeout=self.timeout, preload_content=False, decode_content=True,
                                release_conn=False)
        except HTTPError as err:
            if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
                err = err.reason
            # NewConnectionError (refused, unresolvable) subclasses ConnectTimeoutError for history's sake.
            if isinstance(err, Urllib3Timeout) and not isinstance(err, urllib3.exceptions.NewConnectionError):
                raise UpstreamTimeout(f"The provider {provider.name!r} did not answer in time.") from err
            log.warning("upstream %s unreachable: %s", provider.name, type(err).__name__)
            raise UpstreamError(f"The provider {provider.name!r} could not be reached.") from err


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
    # Without a Content-Encoding (we ask for identity), skip urllib3's decoder and its buffer: per read that
    # is most of urllib3's cost, and a stream makes one read per event.
    decode = resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
    try:
        while data := resp.read1(_READ_SIZE, decode_content=decode):
            yield data
    except urllib3.exceptions.ReadTimeoutError as err:
        raise UpstreamTimeout(f"The provider {provider!r} went silent for too long.") from err
    except (HTTPError, OSError, ValueError) as err:
        raise UpstreamError(f"The connection to the provider {provider!r} broke mid-answer.") from err


def close(resp: Response, complete: bool) -> None:
    """Done with an answer: keep its connection for the next request if it was read to the end (and the
    provider did not ask to close it), else close the connection."""
    if not complete or resp.headers.get("Connection", "").lower() == "close":
        resp.close()
    resp.release_conn()


def shutdown(resp: Response) -> None:
    """Shut the answer's socket down from another thread: a relay blocked reading it wakes up at once."""
    conn = resp.connection
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:               # already closed
            pass
