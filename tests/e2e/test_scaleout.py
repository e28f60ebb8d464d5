"""Several gateways, one truth: two gateway instances (separate gunicorn masters on separate ports, 2 workers
each, the shipped gunicorn.conf.py) sharing one database and one rate-limit storage, as on several boxes.

Run on PostgreSQL + memcached and on MariaDB + Redis. Keys are administered with the ``boundless`` CLI of one
instance and used on the other. Each instance keeps the production key cache (BOUNDLESS_KEY_CACHE_SECONDS=1).

* the rate limit is exact across instances (40 concurrent requests, rpm=10 → exactly 10 admitted);
* credit is never overdrawn across instances (a balance for 5 worst cases → at most 5 admitted at once);
* key changes (create, limits, top-up, revoke) made through one instance's CLI hold on both within 2 s;
* kill -9 of an instance's workers mid-stream: the caller's connection breaks, the held reservation is given
  back (``worker_lost``, charge 0) within seconds, and the other instance serves throughout;
* SIGTERM to an instance's master with a short graceful timeout: an open stream is cut near the deadline with
  one SSE error event, settled as an estimate, the master exits 0, and the other instance serves throughout.

Every test ends with :func:`support.ledger_check` (entries - charges - held = balance, charges = spent, ≥ 0).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from app.accounting.billing import prompt_upper_bound
from app.accounting.credits import to_credits
from app.store.models import ApiKey
from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from support import PAID_IN
from support import PAID_OUT
from support import Database
from support import Gateway
from support import Memcached
from support import flush_redis
from support import ledger_check

REDIS_DB = 9
#: Within this many seconds of a CLI change every worker of every instance must apply it (cache TTL is 1 s).
PROPAGATION = 2.0


# --------------------------------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------------------------------

class Cluster:
    """Instances of the gateway on one shared database and rate-limit storage."""

    def __init__(self, tmp: Path, upstream: str, database: Database, storage: str) -> None:
        self.tmp, self.upstream, self.database, self.storage = tmp, upstream, database, storage
        self.instances: list[Gateway] = []

    def spawn(self, name: str, env: dict | None = None) -> Gateway:
        gw = Gateway(self.tmp / name, self.upstream, database_url=self.database.url, ratelimit_storage=self.storage,
                     workers=2, env={"BOUNDLESS_KEY_CACHE_SECONDS": "1", **(env or {})})
        self.instances.append(gw)
        return gw.start()

    def stop(self) -> None:
        for gw in self.instances:
            gw.stop()


@pytest.fixture(scope="module", params=[("postgres", "memcached"), ("mariadb", "redis")],
                ids=["postgres+memcached", "mariadb+redis"])
def cluster(request, tmp_path_factory, mock):
    db_kind, storage_kind = request.param
    tmp = tmp_path_factory.mktemp(f"scaleout-{db_kind}")
    database = Database(db_kind, tmp)
    memcached = Memcached() if storage_kind == "memcached" else None
    storage = memcached.uri if memcached else flush_redis(REDIS_DB)
    c = Cluster(tmp, mock.url, database, storage)
    try:
        # As docs/deploying.md says: `boundless db upgrade` once, from one box, before the instances start.
        Gateway(tmp / "admin", mock.url, database_url=database.url, ratelimit_storage=storage).cli("db", "upgrade")
        c.a = c.spawn("a")
        c.b = c.spawn("b")
        yield c
    finally:
        c.stop()
        if memcached:
            memcached.stop()
        else:
            flush_redis(REDIS_DB)
        database.drop()


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def minute_room(need: float) -> None:
    """Wait for the next wall-clock minute if fewer than ``need`` seconds are left in this one."""
    left = 60 - time.time() % 60
    if left < need:
        time.sleep(left + 0.1)


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def chat_body(content: str, model: str = "paid-model", **kw) -> bytes:
    """A compact request body; its length is the gateway's prompt upper bound (no images)."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], **kw}
    return json.dumps(body, separators=(",", ":")).encode()


def post(gw: Gateway, key: str, raw: bytes, stream: bool = False, http: requests.Session | None = None,
         timeout: float = 30) -> requests.Response:
    return (http or session()).post(gw.base_url + "/chat/completions", data=raw, stream=stream, timeout=timeout,
                                    headers=auth(key))


def key_info(gw: Gateway, key: str) -> requests.Response:
    return session().get(gw.base_url + "/key", headers=auth(key), timeout=10)


def worst_case(raw: bytes, max_tokens: int) -> int:
    return prompt_upper_bound(json.loads(raw)) * PAID_IN + max_tokens * PAID_OUT


def price(prompt_tokens: int, completion_tokens: int) -> int:
    return prompt_tokens * PAID_IN + completion_tokens * PAID_OUT


def new_key(gw: Gateway, credit: str = "0", rpm: int = 1000, rpd: int = 1000) -> tuple[str, str]:
    name = "k-" + uuid.uuid4().hex[:10]
    return name, gw.create_key(name, rpm=rpm, rpd=rpd, credit=credit)


@contextlib.contextmanager
def opened(database_url: str):
    db.initialize(make_database(database_url))
    try:
        with db.connection_context():
            yield
    finally:
        db.close_all()


def ledger_rows(database_url: str, name: str) -> list[Usage]:
    with opened(database_url):
        return list(Usage.select().join(ApiKey).where(ApiKey.name == name).order_by(Usage.id))


def key_state(database_url: str, name: str) -> tuple[int, int]:
    with opened(database_url):
        row = ApiKey.get(ApiKey.name == name)
        return row.balance, row.spent


def wait_row(database_url: str, request_id: str, predicate, timeout: float) -> Usage:
    deadline = time.monotonic() + timeout
    while True:
        with opened(database_url):
            row = Usage.get_or_none(Usage.request_id == request_id)
        if row is not None and predicate(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger row {request_id}: not as expected after {timeout}s: "
                                 f"{row and row.__data__}")
        time.sleep(0.1)


def wait_settled(database_url: str, name: str, count: int, timeout: float = 15.0) -> list[Usage]:
    deadline = time.monotonic() + timeout
    while True:
        found = ledger_rows(database_url, name)
        if len(found) >= count and all(r.state == "settled" for r in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger rows not settled after {timeout}s: {[r.__data__ for r in found]}")
        time.sleep(0.1)


def content_count(data: bytes) -> int:
    return len(re.findall(rb'"content":" ?tok', data))


def read_until_content(resp, n: int) -> bytes:
    """Read a stream until it has delivered ``n`` content events; return what was read."""
    buf = b""
    while content_count(buf) < n:
        data = resp.raw.read1(65536)
        assert data, "stream ended early"
        buf += data
    return buf


def sse_events(data: bytes) -> list[str]:
    return [e for e in data.decode(errors="replace").replace("\r\n", "\n").split("\n\n") if e.strip()]


def worker_pids(master: int) -> set[int]:
    """The gunicorn workers of a master: its children, except `boundless db recover` runs it may have started."""
    out = subprocess.run(["ps", "--ppid", str(master), "-o", "pid="], capture_output=True, text=True).stdout
    pids = set()
    for pid in map(int, out.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"app.cli" not in cmdline:
            pids.add(pid)
    return pids


class Background:
    """Chat requests to one instance, back to back, until stopped: proves that instance kept serving.

    Stopping waits until at least ``least`` requests have been answered (up to 15 s more), so the count
    the tests check does not depend on how fast the machine went through the test's own steps.
    """

    def __init__(self, gw: Gateway, key: str, least: int = 10) -> None:
        self.gw, self.key, self.least = gw, key, least
        self.results: list[int | str] = []
        #: When each request was sent (monotonic), in the order of ``results``.
        self.sent: list[float] = []
        self._stop = threading.Event()
        self._deadline = math.inf
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        http = session()
        raw = chat_body("still there?", model="free-model")
        while not (self._stop.is_set() and len(self.results) >= self.least) and time.monotonic() < self._deadline:
            self.sent.append(time.monotonic())
            try:
                self.results.append(post(self.gw, self.key, raw, http=http, timeout=10).status_code)
            except requests.RequestException as err:
                self.results.append(type(err).__name__)
            if not self._stop.is_set():
                self._stop.wait(0.1)

    def sent_after(self, t: float) -> list[int | str]:
        """The results of the requests sent at or after monotonic time ``t``."""
        return [r for r, sent in zip(self.results, self.sent) if sent >= t]

    def __enter__(self) -> "Background":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._deadline = time.monotonic() + 15
        self._stop.set()
        self._thread.join(20)


def warm_up(cluster, key: str, n: int) -> None:
    """n concurrent authenticated reads, spread over both instances, so that every worker has opened its
    database connections (a cold worker opens one per thread on its first burst: with PyMySQL that takes
    ~0.1 s each, serialised by the GIL, which would spread a burst's admissions over seconds)."""
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        http = session()
        barrier.wait(30)
        assert http.get((cluster.a, cluster.b)[i % 2].base_url + "/key", headers=auth(key), timeout=30).ok

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


# --------------------------------------------------------------------------------------------------
# 1. one rate limit across instances
# --------------------------------------------------------------------------------------------------

def test_rate_limit_is_exact_across_instances(cluster, mock):
    a, b = cluster.a, cluster.b
    key = a.create_key(rpm=10, rpd=1000)
    marker = "burst-" + uuid.uuid4().hex
    raw = chat_body(marker, model="free-model")
    n = 40
    barrier = threading.Barrier(n)

    def one(i: int) -> tuple[str, int]:
        gw = (a, b)[i % 2]                           # alternate between the instances
        http = session()
        barrier.wait(30)
        return ("ab"[i % 2], post(gw, key, raw, http=http).status_code)

    minute_room(8)
    results: list[tuple[str, int]] = []
    threads = [threading.Thread(target=lambda i=i: results.append(one(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == n
    assert Counter(s for _, s in results) == {200: 10, 429: 30}, results
    assert sum(1 for r in mock.requests()
               if any(m.get("content") == marker for m in r["body"].get("messages") or [])) == 10
    # Both instances read the same counters: the minute is used up and the day has 990 left, seen from either.
    for gw in (a, b):
        info = key_info(gw, key).json()["data"]
        assert (info["remaining_rpm"], info["remaining_rpd"]) == (0, 990), (gw.port, info)


# --------------------------------------------------------------------------------------------------
# 2. one balance across instances
# --------------------------------------------------------------------------------------------------

def test_credit_is_never_overdrawn_across_instances(cluster):
    a, b = cluster.a, cluster.b
    n = 40
    # Each admitted request holds its reservation for 2 s, longer than 40 requests take to be admitted or
    # refused, so no reservation is given back before every request has been decided.
    json_body = chat_body("count to five", max_tokens=50, mock={"latency": 2.0})
    stream_body = chat_body("count to five", max_tokens=50, stream=True, mock={"ttfb": 2.0, "gap": 0.05})
    worst_hi = max(worst_case(json_body, 50), worst_case(stream_body, 50))
    worst_lo = min(worst_case(json_body, 50), worst_case(stream_body, 50))
    opening = 5 * worst_hi + 1_000
    assert 5 * worst_hi < opening < 6 * worst_lo            # room for 5 worst cases at once, never 6
    name, key = new_key(b, credit=str(to_credits(opening)))
    warm_up(cluster, key, n)
    barrier = threading.Barrier(n)
    results: list[tuple[int, str]] = []
    start = time.monotonic()

    def one(i: int) -> None:
        gw = (a, b)[i % 2]
        raw = stream_body if (i // 2) % 2 else json_body
        http = session()
        barrier.wait(30)
        resp = post(gw, key, raw, stream=raw is stream_body, http=http)
        results.append((resp.status_code, resp.text))
        decided.append((round(time.monotonic() - start, 2), resp.status_code))

    decided: list[tuple[float, int]] = []

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == n
    statuses = [s for s, _ in results]
    ok = statuses.count(200)
    assert 1 <= ok <= 5, sorted(decided)
    assert statuses.count(402) == n - ok, statuses
    for status, text in results:
        if status == 402:
            assert json.loads(text)["error"]["type"] == "insufficient_quota"
        else:
            assert "[DONE]" in text or json.loads(text)["usage"]["completion_tokens"] == 5, text
    settled = wait_settled(cluster.database.url, name, ok)
    assert len(settled) == ok                                # one ledger row per admitted request
    assert all(r.charge == price(len("count to five".split()) + 4, 5) for r in settled)
    charges = sum(r.charge for r in settled)
    balance, spent = key_state(cluster.database.url, name)
    assert balance == opening - charges >= 0 and spent == charges
    ledger_check(cluster.database.url)


# --------------------------------------------------------------------------------------------------
# 3. key administration on one instance, effect on both
# --------------------------------------------------------------------------------------------------

def _everywhere_within(cluster, change_done: float, check, what: str) -> float:
    """Poll both instances until ``check(gw)`` holds on both; then, once PROPAGATION seconds have passed since
    the change, require it on every one of several requests to each (so on every worker). Returns the seconds
    until it was first seen on both."""
    seen = None
    while seen is None and time.monotonic() < change_done + PROPAGATION:
        if all(check(gw) for gw in (cluster.a, cluster.b)):
            seen = time.monotonic() - change_done
        else:
            time.sleep(0.05)
    assert seen is not None, f"{what}: not on both instances within {PROPAGATION}s"
    time.sleep(max(0.0, change_done + PROPAGATION - time.monotonic()))
    for gw in (cluster.a, cluster.b):
        for _ in range(8):
            assert check(gw), f"{what}: a worker of the instance on port {gw.port} still has the old state"
    return seen


def test_key_changes_propagate_to_every_instance(cluster):
    a, b = cluster.a, cluster.b
    db_url = cluster.database.url
    minute_room(30)
    name = "prop-" + uuid.uuid4().hex[:8]
    key = a.create_key(name, rpm=1000, rpd=1000, credit="0")        # created through A's CLI ...
    free = chat_body("hello", model="free-model")
    paid = chat_body("hello", max_tokens=10)
    assert post(b, key, free).status_code == 200                   # ... works on B at once
    assert post(b, key, paid).status_code == 402

    # top-up through A: balances are never cached, paid requests pass on both
    a.cli("keys", "topup", name, "1")
    done = time.monotonic()
    _everywhere_within(cluster, done, lambda gw: Decimal(key_info(gw, key).json()["data"]["balance"]) > 0, "top-up")
    for gw in (a, b):
        assert post(gw, key, paid).status_code == 200

    # a new rate limit through A, leaving the key exactly one more request in this minute
    info = key_info(a, key).json()["data"]
    rpm = info["rpm"] - info["remaining_rpm"] + 1
    a.cli("keys", "update", name, "--rpm", str(rpm))
    done = time.monotonic()
    _everywhere_within(cluster, done, lambda gw: key_info(gw, key).json()["data"]["rpm"] == rpm, "rpm update")
    assert post(b, key, free).status_code == 200
    refused = post(a, key, free)
    assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-requests"] == str(rpm)

    # revocation through B: 401 everywhere
    b.cli("keys", "revoke", name)
    done = time.monotonic()
    _everywhere_within(cluster, done, lambda gw: key_info(gw, key).status_code == 401, "revocation")
    for gw in (a, b):
        assert post(gw, key, free).status_code == 401
    ledger_check(db_url)


# --------------------------------------------------------------------------------------------------
# 4. kill -9 mid-stream
# --------------------------------------------------------------------------------------------------

def test_kill_9_of_a_worker_mid_stream(cluster, mock):
    a, b = cluster.a, cluster.b
    db_url = cluster.database.url
    name, key = new_key(a, credit="5")
    _, b_key = new_key(b)
    marker = uuid.uuid4().hex
    raw = chat_body(f"a long story {marker}", stream=True, mock={"chunks": 200, "gap": 0.1})
    with Background(b, b_key) as background:
        http = session()
        resp = post(a, key, raw, stream=True, http=http)
        assert resp.status_code == 200
        rid = resp.headers["X-Request-Id"]
        buf = read_until_content(resp, 3)
        row = wait_row(db_url, rid, lambda r: r.state == "held", 5)
        serving = int(row.owner.rsplit(":", 1)[1])
        workers = worker_pids(a.proc.pid)
        assert serving in workers, (serving, workers)
        for pid in workers:                                   # every worker of A, the serving one included
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()

        # The caller sees the connection break: no [DONE], no more events.
        broke = False
        try:
            while data := resp.raw.read1(65536):
                buf += data
        except Exception:                                   # urllib3 ProtocolError (incomplete chunked read)
            broke = True
        assert broke, "the stream ended cleanly although its worker was killed"    # chunked body cut short
        assert time.monotonic() - killed < 5
        assert b"[DONE]" not in buf and content_count(buf) < 200, buf[-300:]
        resp.close()

        # The reservation is given back within seconds: nothing charged for the gateway's own crash.
        row = wait_row(db_url, rid, lambda r: r.state == "settled", 10)
        assert (row.outcome, row.charge, row.estimated) == ("worker_lost", 0, True), row.__data__
        assert time.monotonic() - killed < 10
        assert key_state(db_url, name) == (5_000_000, 0)
        ledger_check(db_url)

        # The provider's connection went with the worker.
        assert mock.wait_for(lambda r: marker in json.dumps(r["body"]) and r["client_closed"], timeout=5)

        # gunicorn respawned A's workers; A serves again.
        deadline = time.monotonic() + 20
        while True:
            try:
                if post(a, key, chat_body("back?", model="free-model"), timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "instance A did not come back"
            time.sleep(0.2)
        assert not (worker_pids(a.proc.pid) & workers)
    # B kept serving: every request answered, those sent after A's workers were killed too.
    assert background.sent_after(killed), "B sent nothing after A's workers were killed"
    assert len(background.results) >= 10 and set(background.results) == {200}, background.results


# --------------------------------------------------------------------------------------------------
# 5. SIGTERM to a master with a stream open
# --------------------------------------------------------------------------------------------------

def test_sigterm_cuts_open_stream_at_the_deadline_and_settles_it(cluster):
    db_url = cluster.database.url
    grace = 4
    a = cluster.spawn("a-sigterm", env={"BOUNDLESS_GRACEFUL_TIMEOUT": str(grace)})
    b = cluster.b
    name, key = new_key(a, credit="5")
    _, b_key = new_key(b)
    raw = chat_body("a very long story", stream=True, mock={"chunks": 200, "gap": 0.1})
    with Background(b, b_key) as background:
        resp = post(a, key, raw, stream=True, http=session())
        assert resp.status_code == 200
        rid = resp.headers["X-Request-Id"]
        buf = read_until_content(resp, 3)
        before = content_count(buf)
        a.proc.send_signal(signal.SIGTERM)
        term = time.monotonic()
        last = term
        while data := resp.raw.read1(65536):
            buf += data
            last = time.monotonic()
        resp.close()
        ended = last - term
        # The stream kept flowing after SIGTERM, then was cut just before the graceful deadline (grace - 1.5 s).
        assert grace - 2.5 < ended < grace, ended
        assert content_count(buf) - before >= 10
        events = sse_events(buf)
        assert events[-1].startswith("data: {") and b"[DONE]" not in buf, events[-3:]
        error = json.loads(events[-1][6:])
        assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
        assert error["error"]["code"] == "shutting_down", error      # not blamed on the provider

        # The master exits cleanly once its workers have.
        assert a.proc.wait(grace + 10) == 0, a.log()[-3000:]
        assert time.monotonic() - term < grace + 3

        row = wait_row(db_url, rid, lambda r: r.state == "settled", 5)
        delivered = content_count(buf)
        assert row.estimated is True and row.completion_tokens == delivered, row.__data__
        assert row.outcome == "shutdown", row.__data__
        assert row.prompt_tokens == math.ceil(len(raw) / 4)
        assert row.charge == price(row.prompt_tokens, row.completion_tokens) > 0
        assert key_state(db_url, name) == (5_000_000 - row.charge, row.charge)
        ledger_check(db_url)
    assert len(background.results) >= 10 and set(background.results) == {200}, background.results
