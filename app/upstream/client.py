"""
app.upstream.client
~~~~~~~~~~~~~~~~~~~

The client side of the gateway: calls to providers through ``requests`` (one :class:`requests.Session` per
worker process, made after the fork), and the translation of every transport failure into the gateway's errors:
no ``requests``, ``urllib3`` or ``http.client`` exception leaves this module.

What the session does and does not do, and why:

* **Every call streams** (``stream=True``); bodies are read with ``read1`` so each event is relayed the moment it
  arrives, whatever the upstream's framing. A compressed body (we ask for identity, some providers compress
  anyway) is decoded by urllib3; the cap (``BOUNDLESS_UPSTREAM_MAX_BODY_BYTES``) counts the decoded bytes.
* **No redirects, no cookies, no ``.netrc``.** A redirect would carry the provider key elsewhere; a cookie jar
  would carry one caller's provider cookies to the next caller; ``.netrc`` can replace the ``Authorization``
  header. The session does not trust the environment (``trust_env = False``), so the proxy and CA variables
  that ``requests`` would read (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``,
  ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, and ``SSL_CERT_FILE``) are read here, once per provider and worker,
  with ``requests``' own functions; a provider's ``proxy`` and ``ca_bundle`` in the catalogue win over them.
  Certificates and host names are always verified.
* **Retries** only for connections that could not be made (refused, timed out), never for a TLS failure (a
  certificate does not get better) nor for a request that reached the provider.
* **Timeouts** are ``(connect, read)``: the read timeout is the longest silence between two reads, not a limit on
  a whole stream.

A connection goes back to the pool (kept alive for the next request) only after its answer was read to the end;
an answer abandoned half-way (the caller hung up, a cut) closes it, so the provider stops generating.
"""
from __future__ import annotations

import http.client
import http.cookiejar
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Iterator

import requests
import requests.adapters
import requests.exceptions
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict
from requests.utils import get_environ_proxies
from urllib3.util import Retry
from urllib3.util import Timeout

from ..catalog import Model
from ..catalog import Provider
from ..errors import UpstreamError
from ..errors import UpstreamTimeout

log = logging.getLogger("boundless")

#: What the gateway holds of an upstream answer: its status and headers, body not yet read.
Response = requests.Response

#: Bytes asked of urllib3 per read: an SSE event, or a whole JSON answer, in one call.
READ_SIZE = 65536

#: Default of BOUNDLESS_UPSTREAM_MAX_BODY_BYTES: the largest answer (decoded) read into memory.
DEFAULT_MAX_BODY = 64 * 1024 * 1024

#: Everything the transport may raise while a call is opened or its body read (http.client raises ValueError
#: for some malformed framing, and OSError for a socket shut down under a read).
_TRANSPORT_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                     OSError, ValueError)


@dataclass(frozen=True)
class _Route:
    """How one provider is reached from this worker: URL, proxies and CA, read once."""

    url: str
    proxies: dict
    verify: bool | str


@dataclass(frozen=True)
class _Call:
    """A provider's request, all but its body and Content-Length (cached per provider, stream and key)."""

    route: _Route
    headers: CaseInsensitiveDict


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """A cookie policy that accepts no cookie from any provider and returns none."""

    def set_ok(self, cookie, request) -> bool:
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


class _BareCR(http.client.HTTPException):
    """An answer's head holds a CR that does not end a line."""


class _HeadLines:
    """Stands in for an answer's file while http.client reads its head, keeping the raw lines."""

    def __init__(self, fp) -> None:
        self.fp = fp
        self.lines: list[bytes] = []

    def readline(self, limit: int = -1) -> bytes:
        line = self.fp.readline(limit)
        self.lines.append(line)
        return line

    def __getattr__(self, name: str):
        return getattr(self.fp, name)


class _CheckedHTTPResponse(http.client.HTTPResponse):
    """http.client's answer, refusing a head with a bare CR (RFC 9112 2.2: the element is invalid).

    http.client parses a head with the ``email`` package, which takes a bare CR for the end of a line: a value
    like ``"a\rX-Injected: 1"`` would become two header fields. The head's raw lines are checked here, once,
    before they are parsed; the body is then read from the real file, as usual.
    """

    def begin(self) -> None:
        real, self.fp = self.fp, _HeadLines(self.fp)
        try:
            super().begin()
        finally:
            lines, self.fp = self.fp.lines if isinstance(self.fp, _HeadLines) else [], real
        for line in lines:
            if b"\r" in line[:-2] or (line.endswith(b"\r") and not line.endswith(b"\r\n")):
                self.close()
                raise _BareCR(f"a bare CR in the answer's head: {line[:60]!r}")


class _HTTPConnection(urllib3.connection.HTTPConnection):
    response_class = _CheckedHTTPResponse               # http.client's documented hook for its answers


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = _CheckedHTTPResponse


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose pools check each answer's head (see :class:`_CheckedHTTPResponse`), also through a
    proxy; ``init_poolmanager`` and ``proxy_manager_for`` are the adapter's documented points for this."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


class _Session(requests.Session):
    """A session that follows no redirect, not even to read a redirect's body (a redirect would carry the
    provider key elsewhere): ``get_redirect_target`` is requests' documented hook for that decision."""

    def get_redirect_target(self, resp) -> None:
        return None


class UpstreamClient:
    """Opens requests to providers; safe to share between the threads (or greenlets) of one process."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float = 300.0, pool_size: int = 1024,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        # pool_size: idle keep-alive connections kept per provider origin; more in flight are opened, then closed.
        self.connect_timeout, self.read_timeout, self.pool_size = connect_timeout, read_timeout, pool_size
        self.max_body = max_body
        self._timeout = Timeout(connect=connect_timeout, read=read_timeout)
        self._session: requests.Session | None = None
        self._pid = 0
        #: (provider name, stream, provider key) -> _Call; the name, not the URL: two providers may share a URL
        #: and differ in their headers, proxy or CA.
        self._calls: dict[tuple, _Call] = {}
        self._routes: dict[str, _Route] = {}

    # ------------------------------------------------------------------ per worker

    def session(self) -> requests.Session:
        """This process's session, made on first use in each process (never share a socket across a fork)."""
        if self._pid != os.getpid():
            self._session, self._calls, self._routes, self._pid = self._new_session(), {}, {}, os.getpid()
        return self._session

    def _new_session(self) -> requests.Session:
        session = _Session()
        session.trust_env = False                           # no .netrc; proxies and CAs are read by _route()
        session.cookies.set_policy(_NoCookies())
        # Connections that could not be made are tried again (at once, then after 0.2 s); nothing else is: not a
        # TLS failure, not a request that was sent.
        retry = Retry(total=None, connect=2, read=False, redirect=False, other=0, backoff_factor=0.1)
        adapter = _Adapter(pool_connections=16, pool_maxsize=self.pool_size, max_retries=retry, pool_block=False)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def _route(self, provider: Provider) -> _Route:
        route = self._routes.get(provider.name)
        if route is None:
            route = self._routes[provider.name] = _route(provider)
        return route

    def _call(self, provider: Provider, stream: bool, key: str | None) -> _Call:
        found = self._calls.get((provider.name, stream, key))
        if found is None:
            found = self._calls[(provider.name, stream, key)] = _Call(
                self._route(provider), _request_headers(provider, stream, key))
        return found

    # ------------------------------------------------------------------ calls

    def open(self, model: Model, payload: bytes, stream: bool, path: str | None = None,
             headers: dict | None = None) -> Response:
        """POST ``payload`` to the model's provider; return the response with its body not yet read.

        :param path: the endpoint after the provider's ``base_url`` (default ``/chat/completions``).
        :param headers: more headers for this call (e.g. the caller's ``anthropic-version``).

        :raise UpstreamTimeout: no connection or no response headers in time.
        :raise UpstreamError: the provider could not be reached, or its answer's head is unusable (a malformed
            framing, a header value with a bare CR or LF, a body announced larger than the cap).
        """
        provider = model.provider
        session = self.session()
        call = self._call(provider, stream, provider.api_key())
        request = requests.PreparedRequest()
        request.method, request.url, request.body = "POST", call.route.url, payload
        if path is not None:
            request.url = provider.url(path)        # same host as the chat URL: same proxies and CA
        request.headers = call.headers.copy()
        if headers:
            request.headers.update(headers)
        request.headers["Content-Length"] = str(len(payload))
        try:
            resp = session.send(request, stream=True, timeout=self._timeout, verify=call.route.verify,
                                proxies=call.route.proxies, allow_redirects=False)
        except _TRANSPORT_ERRORS as err:
            raise failure(provider.name, err) from err
        problem = _head_problem(resp, self.max_body)
        if problem:
            resp.close()
            log.warning("upstream %s answered unusably: %s", provider.name, problem)
            raise UpstreamError(f"The provider {provider.name!r} sent an unusable answer: {problem}.")
        return resp

    def get(self, provider: Provider, path: str) -> Response:
        """GET ``path`` under the provider's base URL with its key, as :meth:`open` calls (``boundless
        providers check`` reads ``/models`` this way); the body is not read.

        :raise UpstreamError: as :meth:`open`.
        """
        session = self.session()
        route = self._route(provider)
        headers = _request_headers(provider, False, provider.api_key())
        url = provider.base_url.rstrip("/") + path
        try:
            return session.get(url, headers=headers, stream=True, timeout=self._timeout, verify=route.verify,
                               proxies=route.proxies, allow_redirects=False)
        except _TRANSPORT_ERRORS as err:
            raise failure(provider.name, err, quiet=True) from err

    def read_body(self, resp: Response, provider: str) -> bytes:
        """Read a whole (non-stream) body, at most :attr:`max_body` bytes once decoded, translating errors."""
        complete = False
        parts = []
        size = 0
        try:
            for data in iter_raw(resp, provider):
                size += len(data)
                if size > self.max_body:
                    log.warning("upstream %s answered unusably: a body over %d bytes", provider, self.max_body)
                    raise UpstreamError(f"The provider {provider!r} sent an unusable answer: a body larger than "
                                        f"the gateway accepts ({self.max_body} bytes).")
                parts.append(data)
            complete = True
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except UpstreamError as err:
            if err.__cause__ is not None:
                log.warning("upstream %s failed: %s (%s)", provider, *reason(err.__cause__, reading=True))
            raise
        finally:
            close(resp, complete)


def _route(provider: Provider) -> _Route:
    """Where a provider's calls go and how its certificate is checked, as ``requests`` would read it from the
    environment (but once), with the provider's own ``proxy`` / ``ca_bundle`` first."""
    url = provider.chat_url
    if provider.proxy is None:
        proxies = {k: v for k, v in get_environ_proxies(url).items() if k != "no"}
    elif provider.proxy:
        proxies = {"http": provider.proxy, "https": provider.proxy}
    else:                                                   # proxy = "": none, whatever the environment says
        proxies = {}
    verify = (provider.ca_bundle or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
              or os.environ.get("SSL_CERT_FILE") or True)
    return _Route(url, proxies, verify)


def _request_headers(provider: Provider, stream: bool, key: str | None) -> CaseInsensitiveDict:
    """The head of a request to the provider (without Content-Length)."""
    headers = CaseInsensitiveDict({
        "Content-Type": "application/json", "Accept-Encoding": "identity",
        "Accept": "text/event-stream" if stream else "application/json", "User-Agent": "boundless/0.1",
        **provider.headers})
    if key and provider.api == "anthropic":              # Anthropic's API takes its key as x-api-key
        headers["x-api-key"] = key
    elif key:
        headers["Authorization"] = f"Bearer {key}"
    for name, value in headers.items():
        if any(c in str(name) + str(value) for c in "\r\n\0"):     # a value that would split the request
            raise UpstreamError(f"The provider {provider.name!r} has an invalid header or URL.")
    return headers


def _head_problem(resp: Response, max_body: int) -> str | None:
    """What makes an answer's head unusable, or None.

    http.client reads a ``Content-Length`` it cannot parse as absent (and the body to the close), and a
    ``Transfer-Encoding`` other than plain ``chunked`` as no framing at all: both are refused here, as is a
    header value with a control character that HTTP forbids (RFC 9110 5.5).
    """
    headers = resp.raw.headers
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\0" in value:
            return f"the header {name!r} holds a bare CR, LF or NUL"
    length = headers.get("content-length")
    if length is not None:
        values = {v.strip() for v in length.split(",")}
        if len(values) != 1 or not next(iter(values)).isascii() or not next(iter(values)).isdigit():
            return "an invalid Content-Length"
        if int(values.pop()) > max_body:
            return f"a body larger than the gateway accepts ({max_body} bytes)"
    coding = headers.get("transfer-encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        return "an unsupported Transfer-Encoding"
    return None


def iter_raw(resp: Response, provider: str) -> Iterator[bytes]:
    """Yield the body's bytes as they arrive (decoded if the provider compressed anyway).

    A failure is not logged here: a read that fails because the gateway shut the socket (the caller hung up, a
    graceful stop) is no provider's fault; the caller of this function knows which it was, and logs.
    """
    read1 = resp.raw.read1
    try:
        while data := read1(READ_SIZE, decode_content=True):     # requests opens raw bodies undecoded
            yield data
    except _TRANSPORT_ERRORS as err:
        raise failure(provider, err, reading=True, quiet=True) from err


def close(resp: Response, complete: bool) -> None:
    """Done with an answer: its connection goes back to the pool if the body was read to the end (and the
    provider did not ask to close it: urllib3 has released it already), else the connection is closed."""
    if not complete:
        resp.raw.close()
    resp.close()


def shutdown(resp: Response) -> None:
    """Shut the answer's socket down from another thread or greenlet: a relay blocked reading it wakes up at
    once (urllib3's ``HTTPResponse.shutdown``; nothing to do if the answer was released or closed already)."""
    try:
        resp.raw.shutdown()
    except (OSError, ValueError, RuntimeError):
        pass


# ---------------------------------------------------------------------------------- why a call failed


def failure(provider: str, err: BaseException, reading: bool = False, quiet: bool = False) -> UpstreamError:
    """The gateway's error for a transport exception, after logging its reason and text (unless ``quiet``).

    The caller's message names the kind of failure only (no address, URL or key); the log line has the text.
    """
    kind, detail = reason(err, reading)
    if not quiet:
        log.warning("upstream %s failed: %s (%s)", provider, kind, detail)
    timeout = kind in ("connect timeout", "read timeout")
    cls = UpstreamTimeout if timeout else UpstreamError
    what = _SAID.get(kind, "failed")
    if reading and not timeout:
        what = f"broke off its answer ({kind})"
    return cls(f"The provider {provider!r} {what}.")


_SAID = {
    "certificate": "could not be reached: its TLS certificate was not accepted (certificate error)",
    "tls": "could not be reached: the TLS handshake failed (TLS error)",
    "name resolution": "could not be reached: its host name did not resolve (name resolution)",
    "refused": "could not be reached: the connection was refused (refused)",
    "proxy": "could not be reached through the proxy (proxy error)",
    "connect timeout": "could not be reached in time (connect timeout)",
    "read timeout": "did not answer in time (timeout)",
    "protocol": "broke the HTTP protocol (protocol error)",
    "decode": "sent a body that could not be decoded (decode error)",
    "connection": "could not be reached (connection error)",
    "configuration": "could not be called: the gateway's settings for it are unusable (configuration error)",
}


def reason(err: BaseException, reading: bool = False) -> tuple[str, str]:
    """(kind, text) of a transport failure: the kind one of :data:`_SAID`'s keys, the text the innermost
    exception's, for the log."""
    chain = _chain(err)
    inner = chain[-1]
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return "certificate", str(e)
        if isinstance(e, (_BareCR, urllib3.exceptions.InvalidHeader)):     # the answer's head, not ours
            return "protocol", str(e)
    for e in chain:
        if isinstance(e, (requests.exceptions.ProxyError, urllib3.exceptions.ProxyError)):
            return "proxy", str(inner)
    for e in chain:
        if isinstance(e, (urllib3.exceptions.NameResolutionError, socket.gaierror)):
            return "name resolution", str(inner)
        if isinstance(e, ConnectionRefusedError):
            return "refused", str(inner)
    for e in chain:
        if isinstance(e, (urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout, socket.timeout)):
            return ("read timeout" if reading or not isinstance(e, socket.timeout) else "connect timeout"), str(e)
        if isinstance(e, (urllib3.exceptions.ConnectTimeoutError, requests.exceptions.ConnectTimeout)) and not \
                isinstance(e, urllib3.exceptions.NewConnectionError):
            return "connect timeout", str(e)
    for e in chain:
        if isinstance(e, (ssl.SSLError, urllib3.exceptions.SSLError, requests.exceptions.SSLError)):
            return "tls", str(inner)
        if isinstance(e, (urllib3.exceptions.DecodeError, requests.exceptions.ContentDecodingError)):
            return "decode", str(inner)
        if isinstance(e, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                          requests.exceptions.InvalidHeader, urllib3.exceptions.LocationValueError)) \
                or (isinstance(e, OSError) and "CA certificate bundle" in str(e)):
            return "configuration", str(inner)
    if reading or any(isinstance(e, (urllib3.exceptions.ProtocolError, http.client.HTTPException, ValueError))
                      for e in chain):
        return "protocol", str(inner) or type(inner).__name__
    return "connection", str(inner) or type(inner).__name__


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and what caused it: ``__cause__`` / ``__context__``, a MaxRetryError's reason, a ProxyError's
    original error, and an exception given as the first argument (as requests wraps urllib3's)."""
    out: list[BaseException] = []
    todo = [err]
    while todo and len(out) < 20:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo.extend([getattr(e, "reason", None) if isinstance(getattr(e, "reason", None), BaseException) else None,
                     getattr(e, "original_error", None), e.__cause__, e.__context__,
                     *(a for a in e.args[:1] if isinstance(a, BaseException))])
    return out
