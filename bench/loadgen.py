"""A lean asyncio HTTP/1.1 load driver: closed-loop points and the open-streams capacity test.

Each simulated client owns one keep-alive connection (an :class:`asyncio.Protocol`, no streams layer) and
sends the same pre-built request again and again. Responses are parsed incrementally (``Content-Length``,
chunked, or read-until-close), so a stream's **first chunk** is timestamped the moment its first body bytes
arrive, and its end when the terminating chunk does. One process drives every target the same way, JSON
and SSE alike, so the client's own cost is a constant that cancels out in ratios to the floor.

Correctness is checked, not assumed: a response counts only if its status is 200 and, for a stream, its
last bytes hold ``data: [DONE]`` (for JSON, a closing ``}``). Anything else is an error, by kind.

:func:`run_point` measures throughput and latency over a fixed window after a warm-up;
:func:`run_capacity` holds N streams open at once while probing a cheap GET endpoint.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass
from dataclasses import field
from typing import Callable

now = time.perf_counter

# Parser states.
_HEAD, _BODY, _UNTIL_CLOSE, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER = range(7)


def build_request(method: str, host: str, port: int, path: str, headers: dict[str, str] | None = None,
                  body: bytes | None = None) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: */*"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an unsorted list; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(slots=True)
class Response:
    status: int
    first: float | None     # perf_counter() when the first body bytes arrived
    done: float             # perf_counter() when the response was complete
    size: int               # body bytes
    tail: bytes             # the body's last bytes (for the completeness check)
    close: bool             # the server will close the connection


class ResponseError(Exception):
    """The connection broke before the response was complete."""


class HttpConnection(asyncio.Protocol):
    """One client connection; :meth:`send` writes a request and returns a future of its :class:`Response`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_first: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.on_first = on_first
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.buf = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.state = _HEAD
        self.remaining = 0
        self.status = 0
        self.close_after = False
        self.first: float | None = None
        self.size = 0
        self.tail = b""

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            return                      # nothing asked: ignore (a server must not send unasked)
        self.buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self._fail(ResponseError(f"unparsable response: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None:
            if self.state == _UNTIL_CLOSE:
                self._complete()
            else:
                self._fail(ResponseError("connection closed mid-response" if self.status else "connection closed"))

    # -- API
    def send(self, request: bytes) -> asyncio.Future[Response]:
        self.waiter = fut = self.loop.create_future()
        self.state, self.status, self.close_after, self.first, self.size, self.tail = _HEAD, 0, False, None, 0, b""
        self.buf.clear()
        self.transport.write(request)
        return fut

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- parsing
    def _take(self, buf: bytearray) -> bool:
        """Hand up to ``remaining`` bytes of ``buf`` to the body; True once all of them have arrived."""
        n = min(len(buf), self.remaining)
        self._body(buf[:n])
        del buf[:n]
        self.remaining -= n
        return not self.remaining

    def _body(self, data: bytes | bytearray) -> None:
        if not data:
            return
        if self.first is None:
            self.first = now()
            if self.on_first is not None:
                self.on_first()
        self.size += len(data)
        self.tail = (self.tail + bytes(data))[-32:]

    def _parse(self) -> None:
        buf = self.buf
        while True:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(bytes(buf[:end]))
                del buf[:end + 4]
            elif state == _BODY:
                if self._take(buf):
                    self._complete()
                return
            elif state == _UNTIL_CLOSE:
                self._body(buf)
                buf.clear()
                return
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[:end + 2]
                self.state, self.remaining = (_TRAILER, 0) if size == 0 else (_CHUNK_DATA, size)
            elif state == _CHUNK_DATA:
                if not self._take(buf):
                    return
                self.state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = _CHUNK_SIZE
            else:  # _TRAILER: lines until an empty one
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:
                    self._complete()
                    return

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, status = lines[0].split(b" ", 2)[:2]
        self.status = int(status)
        length, chunked = None, False
        self.close_after = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                self.close_after = b"close" in value if version != b"HTTP/1.0" else b"keep-alive" not in value
        if 100 <= self.status < 200:
            self.state = _HEAD             # an interim response: the real one follows
        elif chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.state, self.remaining = _BODY, length
            if length == 0:
                self._complete()
        else:
            self.state, self.close_after = _UNTIL_CLOSE, True

    def _complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        self.state = _HEAD
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self.status, self.first, now(), self.size, self.tail, self.close_after))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


async def connect(host: str, port: int, on_first: Callable[[], None] | None = None) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: HttpConnection(loop, on_first), host, port)
    return conn


def check(resp: Response, stream: bool) -> str | None:
    """Why this response does not count as a success, or None."""
    if resp.status != 200:
        return f"HTTP {resp.status}"
    if stream:
        return None if b"[DONE]" in resp.tail else "stream without [DONE]"
    return None if b"}" in resp.tail else "truncated JSON"


# --------------------------------------------------------------------------- closed-loop point


@dataclass
class PointStats:
    """What one point measured. Latencies are seconds, from request sent to response complete."""

    window: float
    latencies: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    client_cpu: float = 0.0

    def summary(self) -> dict:
        ms = 1000.0
        out = {"requests": len(self.latencies), "rps": len(self.latencies) / self.window,
               "p50_ms": percentile(self.latencies, 50) * ms, "p99_ms": percentile(self.latencies, 99) * ms,
               "errors": sum(self.errors.values()), "error_kinds": dict(self.errors),
               "client_cpu_pct": 100.0 * self.client_cpu / self.window}
        if self.ttfc:
            out["ttfc_p50_ms"] = percentile(self.ttfc, 50) * ms
            out["ttfc_p99_ms"] = percentile(self.ttfc, 99) * ms
        return out


async def run_point(host: str, port: int, request: bytes, concurrency: int, *, stream: bool, warmup: float,
                    duration: float, warmup_max: float = 10.0, drain_timeout: float = 30.0,
                    on_window: Callable[[str], None] | None = None) -> PointStats:
    """``concurrency`` clients send ``request`` back to back: a warm-up, then ``duration`` seconds measured.

    The clients start spread over the first ``warmup`` seconds (so that fixed-latency answers do not come back
    in lock-step bursts). The warm-up lasts at least ``warmup`` seconds and until every client has had one
    answer (the closed loop is then in its steady state, however slow the target), but at most ``warmup_max``.
    Only responses that complete inside the measuring window count for throughput and latency; errors count
    over the whole point. ``on_window("start")`` / ``on_window("end")`` are called at the window's edges (to
    read the server's CPU time). Requests still running ``drain_timeout`` seconds after the window are aborted
    and count as errors.
    """
    stats = PointStats(window=duration)
    in_window = stats.latencies.append
    ttfc = stats.ttfc.append
    measuring = False
    stop = False
    waiting = concurrency                 # clients without their first answer yet
    all_warm = asyncio.Event()

    def warmed() -> None:
        nonlocal waiting
        waiting -= 1
        if not waiting:
            all_warm.set()

    async def client(delay: float) -> None:
        await asyncio.sleep(delay)
        conn: HttpConnection | None = None
        first = True
        try:
            while not stop:
                if conn is None or conn.lost:
                    try:
                        conn = await connect(host, port)
                    except OSError as exc:
                        stats.errors[f"connect: {type(exc).__name__}"] += 1
                        await asyncio.sleep(0.05)
                        continue
                sent = now()
                try:
                    resp = await conn.send(request)
                except ResponseError as exc:
                    stats.errors[str(exc)] += 1
                    conn.abort()
                    conn = None
                    continue
                finally:
                    if first:
                        first = False
                        warmed()
                why = check(resp, stream)
                if why is not None:
                    stats.errors[why] += 1
                elif measuring:
                    in_window(resp.done - sent)
                    if stream and resp.first is not None:
                        ttfc(resp.first - sent)
                if resp.close:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.abort()

    clients = [asyncio.ensure_future(client(warmup * i / concurrency)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    try:
        await asyncio.wait_for(all_warm.wait(), max(0.0, warmup_max - warmup))
    except asyncio.TimeoutError:
        pass
    cpu0 = time.process_time()
    if on_window:
        on_window("start")
    measuring = True
    await asyncio.sleep(duration)
    measuring, stop = False, True
    if on_window:
        on_window("end")
    stats.client_cpu = time.process_time() - cpu0
    _, late = await asyncio.wait(clients, timeout=drain_timeout)
    for task in late:
        task.cancel()
        stats.errors["timeout"] += 1
    if late:
        await asyncio.wait(late)
    return stats


# --------------------------------------------------------------------------- capacity


@dataclass
class CapacityStats:
    """Result of holding many streams open at once while probing a GET endpoint."""

    streams: int
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    peak_open: int = 0
    ttfc: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    probe: list[float] = field(default_factory=list)
    probe_errors: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        ms = 1000.0
        return {"streams": self.streams, "ok": self.ok, "failed": sum(self.errors.values()),
                "error_kinds": dict(self.errors), "peak_open": self.peak_open,
                "ttfc_p50_ms": percentile(self.ttfc, 50) * ms, "ttfc_p99_ms": percentile(self.ttfc, 99) * ms,
                "duration_p50_s": percentile(self.durations, 50), "duration_max_s": max(self.durations, default=0),
                "probe_count": len(self.probe), "probe_p50_ms": percentile(self.probe, 50) * ms,
                "probe_p99_ms": percentile(self.probe, 99) * ms, "probe_max_ms": max(self.probe, default=0) * ms,
                "probe_errors": sum(self.probe_errors.values()), "probe_error_kinds": dict(self.probe_errors)}


async def run_capacity(host: str, port: int, request: bytes, streams: int, *, ramp: float, deadline: float,
                       probe_request: bytes, probe_interval: float = 0.05,
                       probe_timeout: float = 5.0) -> CapacityStats:
    """Open ``streams`` streams (spread over ``ramp`` seconds) and keep them open until they end.

    Meanwhile ``probe_request`` is sent on its own connection, one every ``probe_interval`` seconds after the
    previous answer; a probe without an answer within ``probe_timeout`` counts as an error and as a latency of
    ``probe_timeout`` in the percentiles (and its connection is replaced). Streams still open ``deadline``
    seconds after the start are aborted as errors.
    """
    stats = CapacityStats(streams=streams)
    open_now = 0
    finished = asyncio.Event()
    remaining = streams

    def opened() -> None:
        nonlocal open_now
        open_now += 1
        stats.peak_open = max(stats.peak_open, open_now)

    async def one(delay: float) -> None:
        nonlocal open_now, remaining
        await asyncio.sleep(delay)
        conn: HttpConnection | None = None
        try:
            conn = await connect(host, port, on_first=opened)
            sent = now()
            resp = await conn.send(request)
            why = check(resp, stream=True)
            if why is None:
                stats.ok += 1
                stats.durations.append(resp.done - sent)
                if resp.first is not None:
                    stats.ttfc.append(resp.first - sent)
            else:
                stats.errors[why] += 1
        except (OSError, ResponseError) as exc:
            stats.errors[str(exc) or type(exc).__name__] += 1
        except asyncio.CancelledError:
            stats.errors["not finished by the deadline"] += 1
            raise
        finally:
            if conn is not None:
                if conn.first is not None:
                    open_now -= 1
                conn.abort()
            remaining -= 1
            if not remaining:
                finished.set()

    async def probe() -> None:
        conn: HttpConnection | None = None
        while not finished.is_set():
            try:
                if conn is None or conn.lost:
                    conn = await asyncio.wait_for(connect(host, port), probe_timeout)
                sent = now()
                resp = await asyncio.wait_for(conn.send(probe_request), probe_timeout)
                stats.probe.append(resp.done - sent)
                if resp.status != 200:
                    stats.probe_errors[f"HTTP {resp.status}"] += 1
                if resp.close:
                    conn.close()
                    conn = None
            except (OSError, ResponseError, asyncio.TimeoutError) as exc:
                stats.probe_errors[type(exc).__name__] += 1
                stats.probe.append(probe_timeout)       # a failed probe counts as the longest wait
                if conn is not None:
                    conn.abort()
                conn = None
            try:
                await asyncio.wait_for(finished.wait(), probe_interval)
            except asyncio.TimeoutError:
                pass
        if conn is not None:
            conn.close()

    tasks = [asyncio.ensure_future(one(ramp * i / streams)) for i in range(streams)]
    prober = asyncio.ensure_future(probe())
    _, late = await asyncio.wait(tasks, timeout=deadline)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late)
    finished.set()
    await prober
    return stats


async def fetch(host: str, port: int, request: bytes, timeout: float = 10.0) -> tuple[Response, float]:
    """One request on a fresh connection: (response, seconds it took). Raises on any failure."""
    conn = await asyncio.wait_for(connect(host, port), timeout)
    try:
        sent = now()
        resp = await asyncio.wait_for(conn.send(request), timeout)
        return resp, resp.done - sent
    finally:
        conn.abort()
