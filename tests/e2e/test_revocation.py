"""A revoked key is refused by every gateway and every worker within 2 s (issue 15, hole 11).

Two gateway instances (separate gunicorn masters, 2 workers each, the shipped gunicorn.conf.py and the shipped
key cache, ``BOUNDLESS_KEY_CACHE_SECONDS=1``) share one PostgreSQL or MariaDB database, as on two boxes, while
paid JSON requests and streams of another key keep every worker busy. Twenty rounds of: create a key through one
instance's CLI; call both instances with it until every worker of each has answered it with a 200 (so each has
it cached as valid); revoke it through the other instance's CLI; then call both instances, on new connections
and on kept-alive ones, ``GET /models`` and chat completions, until every worker of each has refused it.

Which worker answered is read from gunicorn's access log (``%(p)s``, by the answer's ``X-Request-Id``), so "every
worker" is checked, not assumed. A 200 to a request *sent* more than 2 s after the revocation returned fails
the test (a request sent before may still be answered later: it was admitted before the key was revoked).
"""
from __future__ import annotations

import subprocess
import threading
import time
import uuid

import pytest
import requests

from support import Database
from support import Gateway
from support import ledger_check

ROUNDS = 20
#: The README promises revocations show within BOUNDLESS_KEY_CACHE_SECONDS (1 s); 2 s leaves room for the CLI.
WITHIN = 2.0


@pytest.fixture(params=["postgres", "mariadb"])
def pair(request, tmp_path, mock):
    database = Database(request.param, tmp_path)
    counters = f"sqlite:///{tmp_path / 'ratelimit.db'}"       # one box: both instances share the counter file
    gateways = []
    try:
        for name in ("a", "b"):
            gw = Gateway(tmp_path / name, mock.url, database_url=database.url, ratelimit_storage=counters,
                         env={"BOUNDLESS_KEY_CACHE_SECONDS": "1",
                              "BOUNDLESS_ACCESS_LOG": str(tmp_path / name / "access.log"),
                              "GUNICORN_CMD_ARGS": f"--access-logformat '{ACCESS_FORMAT}'"})
            gateways.append(gw)
            gw.start()
        yield gateways
    finally:
        for gw in gateways:
            gw.stop()
        database.drop()


#: gunicorn's access line: worker pid, status, the answer's request id.
ACCESS_FORMAT = "%(p)s %(s)s %({x-request-id}o)s"


def worker_pids(gw: Gateway) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(gw.proc.pid)], capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()}


def answered_by(gw: Gateway) -> dict[str, tuple[int, int]]:
    """request id -> (worker pid, status), from the gateway's access log."""
    out = {}
    log = gw.tmp / "access.log"
    for line in (log.read_text().splitlines() if log.exists() else []):
        pid, status, rid = line.split(" ")
        out[rid] = (int(pid.strip("<>")), int(status))        # %(p)s is "<pid>"
    return out


class Caller:
    """Calls one gateway with a key and notes, per answer, when it was sent, its status and its request id."""

    def __init__(self, gw: Gateway, key: str) -> None:
        self.gw, self.key = gw, key
        self.kept = requests.Session()          # one kept-alive connection (stays on one worker)
        self.kept.trust_env = False
        self.calls: list[tuple[float, int, str]] = []

    def once(self, n: int) -> None:
        """One call: ``/models`` or a free chat completion, on a new connection or the kept-alive one."""
        headers = {"Authorization": f"Bearer {self.key}"}
        if n % 2 == 0:                          # a new connection: may land on any worker
            http = requests.Session()
            http.trust_env = False
            headers["Connection"] = "close"
        else:
            http = self.kept
        sent = time.monotonic()
        if n % 4 < 2:
            resp = http.get(self.gw.base_url + "/models", headers=headers, timeout=10)
        else:
            resp = http.post(self.gw.base_url + "/chat/completions", headers=headers, timeout=10,
                             json={"model": "free-model", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code in (200, 401), (resp.status_code, resp.text[:200])
        self.calls.append((sent, resp.status_code, resp.headers["X-Request-Id"]))
        if http is not self.kept:
            http.close()

    def close(self) -> None:
        self.kept.close()


def until_every_worker(pair: list[Gateway], key: str, status: int, since: float, timeout: float = 15.0
                       ) -> list[tuple[Gateway, float, int, int]]:
    """Call both gateways until every worker of each has answered ``status`` to a call sent after ``since``;
    return every call sent after ``since``: (gateway, seconds after ``since``, worker pid, status)."""
    callers = [Caller(gw, key) for gw in pair]
    deadline = time.monotonic() + timeout
    n = 0
    try:
        while True:
            for caller in callers:
                caller.once(n)
            n += 1
            if n % 8:
                continue
            calls, missing = [], []
            for caller in callers:
                by_id = answered_by(caller.gw)
                seen = set()
                for sent, code, rid in caller.calls:
                    if sent >= since and rid in by_id:
                        pid, logged = by_id[rid]
                        assert logged == code, (rid, logged, code)
                        calls.append((caller.gw, sent - since, pid, code))
                        if code == status:
                            seen.add(pid)
                missing += [(caller.gw.port, pid) for pid in caller.gw.workers_pids - seen]
            if not missing:
                return calls
            assert time.monotonic() < deadline, f"no {status} from these workers (port, pid) in {timeout}s: {missing}"
    finally:
        for caller in callers:
            caller.close()


class Traffic:
    """Other callers meanwhile, on both instances: paid JSON requests and paid streams (reservations, settlements,
    key lookups on every worker), until stopped. Every answer must be a 200."""

    def __init__(self, gateways: list[Gateway], key: str) -> None:
        self.gateways, self.key = gateways, key
        self.stop = threading.Event()
        self.answers: list[int] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        with requests.Session() as http:
            http.trust_env = False
            while not self.stop.is_set():
                gw = self.gateways[n % len(self.gateways)]
                body = {"model": "paid-model", "max_tokens": 10, "stream": n % 3 == 0,
                        "messages": [{"role": "user", "content": f"hello {n}"}]}
                resp = http.post(gw.base_url + "/chat/completions", json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {self.key}"})
                self.answers.append(resp.status_code)
                n += 1

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)


def test_revocation_reaches_every_gateway_and_worker_within_2s(pair):
    busy = pair[0].create_key("busy", rpm=100_000, rpd=100_000, credit="1000")
    with Traffic(pair, busy) as traffic:
        revocation_rounds(pair)
    assert traffic.answers and set(traffic.answers) == {200}, sorted(set(traffic.answers))
    ledger_check(pair[0].database_url)


def revocation_rounds(pair: list[Gateway]) -> None:
    for gw in pair:
        gw.workers_pids = worker_pids(gw)
        assert len(gw.workers_pids) == 2, gw.workers_pids
    for round_ in range(ROUNDS):
        admin, other = pair[round_ % 2], pair[(round_ + 1) % 2]
        name = f"rev-{round_}-{uuid.uuid4().hex[:6]}"
        key = admin.create_key(name, rpm=100_000, rpd=100_000)
        until_every_worker(pair, key, 200, time.monotonic())     # every worker of both caches it as valid
        other.cli("keys", "revoke", name)
        revoked = time.monotonic()
        calls = until_every_worker(pair, key, 401, revoked)
        late = [(gw.port, pid, round(after, 2)) for gw, after, pid, code in calls if code == 200 and after > WITHIN]
        assert not late, (f"round {round_}: key still accepted more than {WITHIN}s after revocation, "
                          f"{len(late)} times (port, pid, s): {late[:3]} ... {late[-3:]}")
        # every worker refused it, and once a worker had refused it, it never accepted it again
        for gw, after, pid, code in calls:
            first_401 = min(a for g, a, p, c in calls if g is gw and p == pid and c == 401)
            assert code == 401 or after < first_401, (round_, gw.port, pid, after, first_401)
    for gw in pair:                                  # no worker was replaced meanwhile (a new one has no cache)
        assert worker_pids(gw) == gw.workers_pids
