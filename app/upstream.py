"""
app.upstream
~~~~~~~~~~~~

The client side of the gateway: one pooled ``requests.Session`` per worker process, and the translation of
every transport failure into the gateway's errors (no ``requests``/``urllib3`` exception leaves this module).

The session keeps no cookies (a provider's cookie must never travel with another caller's request), ignores
proxy variables and ``.netrc`` (``trust_env = False``), and retries only failed *connections*, never a request
that reached the provider. Timeouts are ``(connect, read)``: the read timeout is the longest silence between
two bytes, not a limit on a whole stream. Streams are read with ``raw.read1`` so each event is relayed the
moment it arrives, whatever the upstream's framing.
"""
from __future__ import annotations

import logging
import os
import threading
from http.cookiejar import DefaultCookiePolicy
from typing import Iterator

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .catalog import Model
from .errors import UpstreamError
from .errors import UpstreamTimeout

log = logging.getLogger("boundless")

_READ_SIZE = 65536


class _NoCookies(DefaultCookiePolicy):
    def set_ok(self, cookie, request):
        return False

    def return_ok(self, cookie, request):
        return False


class UpstreamClient:
    """Opens requests to providers; safe to share between the threads (or greenlets) of one process."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float = 300.0, pool_size: int = 256) -> None:
        self.timeout = (connect_timeout, read_timeout)
        self.pool_size = pool_size
        self._session: requests.Session | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        if self._pid != os.getpid():          # never use sockets inherited across a fork
            with self._lock:
                if self._pid != os.getpid():
                    self._session, self._pid = self._new_session(), os.getpid()
        return self._session

    def _new_session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.cookies.set_policy(_NoCookies())
        adapter = HTTPAdapter(pool_connections=16, pool_maxsize=self.pool_size, pool_block=False,
                              max_retries=Retry(total=2, connect=2, read=0, status=0, redirect=0, other=0,
                                                backoff_factor=0.1, raise_on_status=False))
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        return s

    def open(self, model: Model, payload: bytes, stream: bool) -> requests.Response:
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
        try:
            return self.session.post(provider.chat_url, data=payload, headers=headers, stream=True,
                                     timeout=self.timeout, allow_redirects=False)
        except requests.Timeout as err:
            raise UpstreamTimeout(f"The provider {provider.name!r} did not answer in time.") from err
        except requests.RequestException as err:
            log.warning("upstream %s unreachable: %s", provider.name, type(err).__name__)
            raise UpstreamError(f"The provider {provider.name!r} could not be reached.") from err


def read_body(resp: requests.Response, provider: str) -> bytes:
    """Read a whole (non-stream) body, translating transport errors."""
    try:
        return b"".join(iter_raw(resp, provider))
    finally:
        resp.close()


def iter_raw(resp: requests.Response, provider: str) -> Iterator[bytes]:
    """Yield the body's bytes as they arrive (decoded if the provider compressed anyway)."""
    raw = resp.raw
    try:
        while data := raw.read1(_READ_SIZE, decode_content=True):
            yield data
    except urllib3.exceptions.ReadTimeoutError as err:
        raise UpstreamTimeout(f"The provider {provider!r} went silent for too long.") from err
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as err:
        raise UpstreamError(f"The connection to the provider {provider!r} broke mid-answer.") from err
