"""
app.upstream.http1
~~~~~~~~~~~~~~~~~~

The HTTP/1.1 client of the gateway's upstream calls: keep-alive connections per origin, one ``POST`` per call
(head and body in one write), the answer's head parsed at once and its body read as it arrives.

It does exactly what the gateway needs and nothing else: no redirects, no cookies, no proxies, no request
bodies other than bytes, no pipelining. What it does, it does by RFC 9112: status line and header fields
(1xx answers skipped, obsolete line folding joined), the body framed by ``Transfer-Encoding: chunked``, by
``Content-Length`` or by the connection's close, and a ``gzip``/``deflate`` body decoded on request. A
connection is kept for the next call only when its answer was read to its end and neither side asked to
close it.

Why not urllib3: on this path it cost the gateway about 0.2 ms of CPU per call (measured against the same
mock: 220–240 µs per request and answer through ``HTTPConnectionPool.urlopen``, 30–40 µs on a bare socket; see
docs/benchmarks.md): a ``Retry`` and a ``Timeout`` object per call, http.client's header parsing through the
``email`` package, a buffered file per answer, a queue per pool. Here a call is a dictionary lookup, one
``send()``, one or two ``recv()`` and a split.

Errors are this module's own (:class:`HTTPError` and its subclasses); app/upstream/client.py turns them into the
gateway's.
"""
from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
import zlib

from ..server import onewrite

#: Bytes asked of the kernel per read: an SSE event, or a whole JSON answer, in one call.
READ_SIZE = 65536
#: Longest response head accepted (status line and header fields).
MAX_HEAD = 65536
MAX_HEADERS = 100


class HTTPError(Exception):
    """Any failure of a call."""


class ConnectFailed(HTTPError):
    """No connection: refused, unresolvable, unreachable, or the TLS handshake failed."""


class ConnectTimedOut(HTTPError):
    """No connection within the connect timeout."""


class ReadTimedOut(HTTPError):
    """The server was silent for longer than the read timeout (before its head, or between two reads)."""


class ProtocolError(HTTPError):
    """The server broke HTTP/1.1, or closed the connection before its answer was complete."""


class Headers(dict):
    """Response header fields by lower-case name; a repeated field's values joined with ``", "``."""

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


class Connection:
    """One socket to an origin and the bytes read from it but not consumed yet."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def recv(self) -> bytes:
        """The next bytes from the server (``b""`` at its close)."""
        try:
            return self.sock.recv(READ_SIZE)
        except socket.timeout as err:                    # the read timeout: silence between two reads
            raise ReadTimedOut("the server went silent") from err
        except OSError as err:                           # reset, or shut down under us (app/upstream/streams.py)
            raise ProtocolError(f"the connection broke: {err}") from err

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


#: How a response's body ends.
_NONE, _LENGTH, _CHUNKED, _CLOSE = 0, 1, 2, 3


class Response:
    """An answer whose head has been read; read its body with :meth:`read1`, then :meth:`release` it."""

    def __init__(self, pool: "Pool", conn: Connection, version: int, status: int, reason: str,
                 headers: Headers) -> None:
        self._pool = pool
        self.connection = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self._reusable = version >= 11 and "close" not in headers.get("connection", "").lower()
        self._left = 0                   # bytes left: of the body (_LENGTH) or of the current chunk (_CHUNKED)
        self._crlf = False               # _CHUNKED: a chunk's data was read, its CRLF not yet
        self._decoder = None
        self._decoding = False
        self.complete = False
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if status in (204, 304) or 100 <= status < 200:
            self._mode = _NONE
        elif te is not None:
            # Chunked must be the last coding; anything else is read to the close (RFC 9112 §6.3). With both
            # fields, Transfer-Encoding wins and the connection must not be reused.
            self._mode = _CHUNKED if te.rsplit(",", 1)[-1].strip().lower() == "chunked" else _CLOSE
            if cl is not None or self._mode == _CLOSE:
                self._reusable = False
        elif cl is not None:
            self._mode, self._left = _LENGTH, _content_length(cl)
        else:
            self._mode, self._reusable = _CLOSE, False
        if self._mode == _NONE or (self._mode == _LENGTH and self._left == 0):
            self.complete = True

    # ------------------------------------------------------------------ the body

    def read1(self, n: int = READ_SIZE, decode_content: bool = True) -> bytes:
        """Body bytes that have arrived (waiting, with the read timeout, only when none have): up to about
        ``n`` of them, the whole buffer of a chunked body's chunks that came together; ``b""`` at the end.

        :raise ReadTimedOut: nothing arrived within the read timeout.
        :raise ProtocolError: the connection closed or broke before the end, or the framing is invalid.
        """
        if decode_content and not self._decoding and not self.complete:
            self._start_decoding()
        if self._decoder is None:
            return self._read_raw(n)
        try:
            while True:                          # compressed bytes may decode to nothing yet: read on
                data = self._read_raw(n)
                if not data:
                    return self._decoder.flush()
                if data := self._decoder.decompress(data):
                    return data
        except zlib.error as err:
            raise ProtocolError(f"the body could not be decoded: {err}") from err

    def _read_raw(self, n: int) -> bytes:
        if self.complete:
            return b""
        conn = self.connection
        if self._mode == _LENGTH:
            if not conn.buf:
                conn.buf = conn.recv()
                if not conn.buf:
                    raise ProtocolError(f"the connection closed with {self._left} bytes of the body unread")
            data = conn.buf[:min(n, self._left)]
            conn.buf = conn.buf[len(data):]
            self._left -= len(data)
            self.complete = self._left == 0
            return data
        if self._mode == _CHUNKED:
            return self._read_chunks(n)
        data, conn.buf = conn.buf[:n], conn.buf[n:]     # _CLOSE: to the end of the connection
        if not data:
            data = conn.recv()
            if not data:
                self.complete = True
        return data

    def _read_chunks(self, n: int) -> bytes:
        conn = self.connection
        parts = []
        size = 0
        while size < n:
            if self._crlf:                       # the CRLF after a chunk's data
                if len(conn.buf) < 2:
                    if parts:
                        break
                    self._fill(2)
                if conn.buf[:2] != b"\r\n":
                    raise ProtocolError("a chunk's data is not followed by CRLF")
                conn.buf, self._crlf = conn.buf[2:], False
            if self._left == 0:                  # a chunk header: size in hex, maybe ;extensions
                end = conn.buf.find(b"\r\n")
                if end < 0:
                    if parts:
                        break
                    self._fill_line()
                    end = conn.buf.find(b"\r\n")
                chunk = _chunk_size(conn.buf[:end])
                if chunk == 0:                    # the last chunk, then trailer fields and a blank line
                    if parts and conn.buf[end + 2:end + 4] != b"\r\n":
                        break                    # (not all here yet: relay what we have first)
                    conn.buf = conn.buf[end + 2:]
                    self._skip_trailers()
                    self.complete = True
                    break
                conn.buf, self._left = conn.buf[end + 2:], chunk
            if not conn.buf:
                if parts:
                    break
                conn.buf = conn.recv()
                if not conn.buf:
                    raise ProtocolError("the connection closed in the middle of a chunked body")
            take = min(self._left, n - size)
            data = conn.buf[:take]
            conn.buf = conn.buf[len(data):]
            self._left -= len(data)
            self._crlf = self._left == 0
            parts.append(data)
            size += len(data)
            if not conn.buf:                     # what came is relayed now; the rest when it comes
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _more(self) -> None:
        """Add the server's next bytes to the buffer; in the middle of a chunked body a close is an error."""
        data = self.connection.recv()
        if not data:
            raise ProtocolError("the connection closed in the middle of a chunked body")
        self.connection.buf += data

    def _fill(self, want: int) -> None:
        while len(self.connection.buf) < want:
            self._more()

    def _fill_line(self) -> None:
        while b"\r\n" not in self.connection.buf:
            if len(self.connection.buf) > MAX_HEAD:
                raise ProtocolError("a chunk header is too long")
            self._more()

    def _skip_trailers(self) -> None:
        conn = self.connection
        while True:
            self._fill_line()
            end = conn.buf.find(b"\r\n")
            line, conn.buf = conn.buf[:end], conn.buf[end + 2:]
            if not line:
                return

    def _start_decoding(self) -> None:
        self._decoding = True
        coding = self.headers.get("content-encoding", "").strip().lower()
        if coding in ("", "identity"):
            return
        if coding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._decoder = _Deflate()
        else:                                     # we ask for identity: anything else we cannot read
            raise ProtocolError(f"unsupported Content-Encoding {coding!r}")

    def read(self) -> bytes:
        """The whole (rest of the) body, decoded."""
        parts = []
        while data := self.read1():
            parts.append(data)
        return b"".join(parts)

    # ------------------------------------------------------------------ the connection

    def release(self, reuse: bool = True) -> None:
        """Done with this answer: its connection goes back to the pool if the body was read to its end, the
        server allows it and ``reuse`` is true; otherwise it is closed (a half-read answer closes it, so a
        server that is still producing stops). Idempotent."""
        conn, self.connection = self.connection, None
        if conn is None:
            return
        if reuse and self.complete and self._reusable and not conn.buf:
            self._pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        self.release(reuse=False)

    @property
    def sock(self) -> socket.socket | None:
        return self.connection.sock if self.connection is not None else None


class _Deflate:
    """``Content-Encoding: deflate``: zlib-wrapped as the RFC says, or raw deflate as some servers send."""

    def __init__(self) -> None:
        self._obj = zlib.decompressobj()
        self._first = True

    def decompress(self, data: bytes) -> bytes:
        if self._first:
            self._first = False
            try:
                return self._obj.decompress(data)
            except zlib.error:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._obj.decompress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


def _content_length(value: str) -> int:
    values = {v.strip() for v in value.split(",")}         # repeated fields are joined with ", "
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise ProtocolError(f"invalid Content-Length {value!r}")
    return int(values.pop())


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip()
    if not size or size.strip(b"0123456789abcdefABCDEF") or len(size) > 16:
        raise ProtocolError(f"invalid chunk size {line[:40]!r}")
    return int(size, 16)


def _parse_head(head: bytes) -> tuple[int, int, str, Headers]:
    """(version 10|11, status, reason, headers) of a response head (without its blank line)."""
    lines = head.split(b"\n")
    version, _, rest = lines[0].rstrip(b"\r").partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"invalid status line {lines[0][:80]!r}")
    if len(lines) > MAX_HEADERS + 1:
        raise ProtocolError("too many header fields")
    headers = Headers()
    last = None
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):             # obsolete line folding: part of the previous field
            if last is None:
                raise ProtocolError("a header field starts with whitespace")
            headers[last] = f"{dict.__getitem__(headers, last)} {line.strip().decode('latin-1')}"
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"invalid header field {line[:80]!r}")
        last = name.decode("latin-1").lower()
        value = value.strip().decode("latin-1")
        old = dict.get(headers, last)
        dict.__setitem__(headers, last, value if old is None else f"{old}, {value}")
    return (11 if version == b"HTTP/1.1" else 10), int(code), reason.decode("latin-1"), headers


class Pool:
    """Keep-alive connections to one origin (``http://host:port`` or ``https://...``), shared by the threads or
    greenlets of one process."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, connect_timeout: float,
                 read_timeout: float, maxsize: int) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.maxsize = maxsize
        self._idle: list[Connection] = []

    def get(self) -> tuple[Connection, bool]:
        """A connection, and whether it was used before (an idle one whose server has not closed it)."""
        idle = self._idle
        while idle:
            try:
                conn = idle.pop()
            except IndexError:                   # another thread took the last one
                break
            if _alive(conn.sock):
                return conn, True
            conn.close()
        return self._connect(), False

    def put(self, conn: Connection) -> None:
        if len(self._idle) < self.maxsize:
            self._idle.append(conn)
        else:
            conn.close()

    def clear(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _connect(self) -> Connection:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except socket.timeout as err:
            raise ConnectTimedOut(f"no connection to {self.host}:{self.port} in {self.connect_timeout} s") from err
        except OSError as err:                   # refused, unreachable, unresolvable (gaierror)
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {err}") from err
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except socket.timeout as err:
            sock.close()
            raise ConnectTimedOut(f"no TLS handshake with {self.host}:{self.port} in time") from err
        except OSError as err:                   # ssl.SSLError (a bad certificate...) is an OSError
            sock.close()
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {err}") from err
        sock.settimeout(self.read_timeout)
        return Connection(sock)

    def post(self, head: bytes, body: bytes, retries: int = 2) -> Response:
        """Send one request (``head`` ends with its blank line) and return its answer, head read.

        A failed connection is tried again ``retries`` times (at once, then after 0.2 s, 0.4 s...); so is a
        kept-alive connection that the server had closed, found when the request could not be written. A
        request that was written is never sent twice.
        """
        attempt = 0
        while True:
            try:
                conn, reused = self.get()
            except (ConnectFailed, ConnectTimedOut):
                if attempt >= retries:
                    raise
                if attempt:
                    time.sleep(0.1 * 2 ** attempt)
                attempt += 1
                continue
            try:
                onewrite.send_all(conn.sock, head + body)
            except OSError as err:
                conn.close()
                if reused:                       # closed by the server while idle: try another
                    continue
                if isinstance(err, socket.timeout):
                    raise ReadTimedOut("the server did not take the request in time") from err
                raise ProtocolError(f"the request could not be sent: {err}") from err
            try:
                return self._response(conn)
            except BaseException:
                conn.close()
                raise

    def _response(self, conn: Connection) -> Response:
        while True:
            buf = conn.buf
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                lf = buf.find(b"\n\n")                   # a server that ends its lines with LF alone
                if lf >= 0:
                    end, skip = lf, 2
                    break
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("the response head is too long")
                data = conn.recv()
                if not data:
                    raise ProtocolError("the server closed the connection without answering")
                buf += data
                end = buf.find(b"\r\n\r\n")
            else:
                skip = 4
            version, status, reason, headers = _parse_head(buf[:end])
            conn.buf = buf[end + skip:]
            if 100 <= status < 200 and status != 101:    # 100 Continue, 103 Early Hints: the answer follows
                continue
            return Response(self, conn, version, status, reason, headers)


def original_poll():
    """The C ``select.poll`` even where gevent patched it: with a zero timeout it never blocks, and gevent's
    stand-in would need a turn of the event loop to see anything. (Not ``select``: a busy worker's descriptors
    pass its limit of 1,024.)"""
    try:
        from gevent.monkey import get_original
    except ImportError:
        return select.poll
    return get_original("select", "poll")


_poll = original_poll()


def _alive(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection can take a request: not readable (a readable idle socket has
    been closed by the server, or holds bytes nobody asked for)."""
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        poller = _poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


class Client:
    """Pools by origin for one process: made anew in a forked child (never share a socket across a fork)."""

    def __init__(self, connect_timeout: float, read_timeout: float, pool_size: int) -> None:
        self.connect_timeout, self.read_timeout, self.pool_size = connect_timeout, read_timeout, pool_size
        self._pools: dict[tuple[str, str, int], Pool] = {}
        self._tls: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def pool(self, scheme: str, host: str, port: int) -> Pool:
        if self._pid != os.getpid():             # a forked child: forget the parent's sockets
            self._pools, self._lock, self._pid = {}, threading.Lock(), os.getpid()
        pool = self._pools.get((scheme, host, port))
        if pool is None:
            with self._lock:
                pool = self._pools.get((scheme, host, port))
                if pool is None:
                    tls = self._tls_context() if scheme == "https" else None
                    pool = self._pools[(scheme, host, port)] = Pool(
                        host, port, tls, self.connect_timeout, self.read_timeout, self.pool_size)
        return pool

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            ctx = ssl.create_default_context(cafile=_ca_certs())
            ctx.set_alpn_protocols(["http/1.1"])
            self._tls = ctx
        return self._tls


def _ca_certs() -> str | None:
    """certifi's bundle when installed (as requests and urllib3 use), else the system's store."""
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()
