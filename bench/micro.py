"""What the limiter and the credit ledger cost per request, measured in-process in one run.

From the repository root::

    .venv/bin/python -m bench.micro            # about a minute; needs PostgreSQL, Redis and memcached

* **Limiter**: ``RateLimiter.hit`` (one request counted in its minute and day windows) on each storage — our
  SQLite file, memcached, Redis — against a no-limit baseline (the same call path with nothing to count), so the
  difference is what the storage adds.
* **Credit**: ``billing.reserve`` + ``billing.settle`` of a paid request (the two transactions every paid request
  runs) on SQLite and PostgreSQL (MariaDB too when it is up).
* **Upstream call**: one JSON chat request and its answer through ``app.upstream.client`` (``UpstreamClient.open`` +
  ``UpstreamClient.read_body``, kept-alive connection) against the mock upstream, next to the same bytes exchanged on a bare
  socket, so the difference is what the HTTP client adds.

Each figure is the median and the 99th percentile of single calls, in microseconds, from one thread (a request
pays it once; contention between concurrent requests is what ``bench.run`` measures). Memcached is started on a
free port for the run; PostgreSQL and MariaDB get a scratch database, dropped at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

from app.accounting import billing
from app.store import schema
from app.accounting.billing import Outcome
from app.catalog import Model
from app.catalog import Provider
from app.store.models import ApiKey
from app.store.models import db
from app.store.models import make_database
from app.limits.ratelimit import RateLimiter

MODEL = Model(id="bench-paid", provider=Provider("mock", "http://127.0.0.1:9/v1", None), upstream_model="m",
              owned_by="bench", input_price=Decimal(1), output_price=Decimal(2))
BODY = {"model": "bench-paid", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}
RAW = b'{"model": "bench-paid", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}'


def timed(fn, n: int) -> tuple[float, float]:
    """(median, p99) in microseconds of ``n`` calls, after a warm-up."""
    for _ in range(min(200, n // 5)):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


class _NoLimit:
    """The baseline: the limiter's call, with no storage behind it."""

    def hit(self, key_id, rpm, rpd):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def limiter_rows(tmp: Path, n: int) -> list[tuple[str, float, float]]:
    rows = [("no limit (baseline)", *timed(lambda: _NoLimit().hit(1, 10**9, 10**9), n))]
    port = _free_port()
    memcached = subprocess.Popen([shutil.which("memcached") or "/usr/bin/memcached", "-l", "127.0.0.1", "-p",
                                  str(port), "-U", "0", "-u", "root"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        for name, uri in (("sqlite (default)", f"sqlite:///{tmp / 'rl.db'}"),
                          ("memcached", f"memcached://127.0.0.1:{port}"),
                          ("redis", "redis://127.0.0.1:6379/8")):
            try:
                limiter = RateLimiter(uri)
                key = uuid.uuid4().int % 10**9
                rows.append((name, *timed(lambda: limiter.hit(key, 10**9, 10**9), n)))
            except Exception as err:        # a storage that is not running: say so, measure the others
                rows.append((f"{name}: {type(err).__name__}", float("nan"), float("nan")))
    finally:
        memcached.terminate()
    return rows


def _scratch_database(kind: str, tmp: Path) -> tuple[str, callable]:
    name = "blbench_" + uuid.uuid4().hex[:8]
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'b.db'}", lambda: None
    if kind == "postgresql":
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="test")
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {name}")

        def drop():
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        return f"postgresql://postgres@127.0.0.1:5432/{name}", drop
    import pymysql
    conn = pymysql.connect(host="127.0.0.1", user="root", password="", autocommit=True)
    conn.cursor().execute(f"CREATE DATABASE {name}")
    return f"mysql://root@127.0.0.1:3306/{name}", lambda: conn.cursor().execute(f"DROP DATABASE {name}")


def billing_rows(tmp: Path, n: int) -> list[tuple[str, float, float]]:
    rows = []
    for kind in ("sqlite", "postgresql", "mariadb"):
        try:
            url, drop = _scratch_database(kind, tmp)
        except Exception as err:
            rows.append((f"{kind}: {type(err).__name__}", float("nan"), float("nan")))
            continue
        try:
            db.initialize(make_database(url))
            with db.connection_context():
                schema.create()
                key = ApiKey.create(name="bench", key_hash=uuid.uuid4().hex, prefix="sk-bench", balance=10**15)
            counter = iter(range(10**9))
            usage = {"prompt_tokens": 5, "completion_tokens": 20}

            def request():
                with db.connection_context():
                    lease = billing.reserve(key.id, MODEL, BODY, RAW, False, f"req_{next(counter)}")
                billing.settle(lease, Outcome(status=200, usage=usage, produced=True))

            rows.append((kind, *timed(request, n)))
        finally:
            db.close_all() if hasattr(db.obj, "close_all") else db.close()
            drop()
    return rows


def upstream_rows(tmp: Path, n: int) -> list[tuple[str, float, float]]:
    from app.upstream.client import UpstreamClient
    from bench import targets

    (tmp / "procs").mkdir(exist_ok=True)
    procs = targets.Processes(tmp / "procs", None)
    try:
        _, port = targets.start_mock(procs)
        model = Model(id="bench", provider=Provider("mock", f"http://127.0.0.1:{port}/v1", None),
                      upstream_model="mock-model", owned_by="bench")
        client = UpstreamClient()
        payload = RAW.replace(b"bench-paid", b"mock-model")

        def gateway_client() -> None:
            client.read_body(client.open(model, payload, False), "mock")

        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))

        def bare_socket() -> None:                   # the same exchange, parsed as little as possible
            sock.sendall(request)
            buf = sock.recv(65536)
            while (end := buf.find(b"\r\n\r\n")) < 0:
                buf += sock.recv(65536)
            length = int(buf[:end].lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(buf) - end - 4 < length:
                buf += sock.recv(65536)

        rows = [("bare socket (the mock and loopback)", *timed(bare_socket, n)),
                ("app.upstream.client (requests, one Session)", *timed(gateway_client, n)),
                *routing_rows(tmp, client, model, payload, n)]
        sock.close()
        return rows
    finally:
        procs.close()


def routing_rows(tmp: Path, client, model: Model, payload: bytes, n: int) -> list[tuple[str, float, float]]:
    """The same call through app.upstream.routing when the first route answers: a one-route model, and one with
    two routes, a pool of two keys and a fallback model, its cool-downs on the SQLite rate-limit storage."""
    from limits.storage import storage_from_string

    from app.catalog import Catalog
    from app.catalog import Limits
    from app.catalog import Route
    from app.catalog import Routing
    from app.upstream.cooldowns import Cooldowns
    from app.upstream.routing import Router
    from app.upstream.routing import known_entries

    os.environ.setdefault("BENCH_KEY_A", "a")
    os.environ.setdefault("BENCH_KEY_B", "b")
    pool = replace(model.provider, name="pool", api_key_env="BENCH_KEY_A", api_key_envs=("BENCH_KEY_A", "BENCH_KEY_B"))
    routed = replace(model, id="routed", provider=pool, routes=(Route(pool, "mock-model"),
                     Route(model.provider, "mock-model", None, 1)), fallbacks=(model,))
    storage = storage_from_string(f"sqlite:///{tmp / 'ratelimit.db'}")
    catalog = Catalog(Limits(), {}, {"bench": model, "routed": routed})
    router = Router(client, Cooldowns(storage, known_entries(catalog)), Routing())

    def through(m: Model):
        return lambda: client.read_body(router.open(m, lambda _: payload, False)[0], "mock")

    return [("app.upstream.routing, one route", *timed(through(model), n)),
            ("app.upstream.routing, 2 routes + key pool + fallback", *timed(through(routed), n))]


def table(title: str, rows: list[tuple[str, float, float]], baseline: float | None = None) -> str:
    out = [f"| {title} | median µs | p99 µs |" + (" added median µs |" if baseline is not None else ""),
           "|---|---:|---:|" + ("---:|" if baseline is not None else "")]
    for name, med, p99 in rows:
        line = f"| {name} | {med:.1f} | {p99:.1f} |"
        if baseline is not None:
            line += f" {med - baseline:+.1f} |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="calls per point (default 3000)")
    args = parser.parse_args()
    os.environ.setdefault("BOUNDLESS_INSTANCE_ID", "bench")
    with tempfile.TemporaryDirectory() as tmp:
        limits = limiter_rows(Path(tmp), args.n)
        credit = billing_rows(Path(tmp), args.n)
        upstream = upstream_rows(Path(tmp), args.n)
    print(table("limiter: one request counted (RPM + RPD)", limits, baseline=limits[0][1]))
    print()
    print(table("credit: reserve + settle of one paid request", credit))
    print()
    print(table("upstream: one JSON call and its answer", upstream, baseline=upstream[0][1]))


if __name__ == "__main__":
    main()
