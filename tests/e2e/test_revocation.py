"""A revoked key is refused by every gateway and every worker within 2 s (issue 15, hole 11).

Two gateway instances (separate gunicorn masters, 2 workers each, the shipped gunicorn.conf.py and the shipped
key cache, ``BOUNDLESS_KEY_CACHE_SECONDS=1``) share one PostgreSQL or MariaDB database, as on two boxes. Twenty
rounds of: create a key through one instance's CLI, use it on both (so every worker has it cached as valid),
revoke it through one instance's CLI, then poll both instances on new connections (so both workers of each are
hit) until every answer is 401. No 200 may come more than 2 s after the revocation returned.
"""
from __future__ import annotations

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
#: Requests per instance, each on a new connection, to be sure both workers answer.
PER_INSTANCE = 8


@pytest.fixture(params=["postgres", "mariadb"])
def pair(request, tmp_path, mock):
    database = Database(request.param, tmp_path)
    counters = f"sqlite:///{tmp_path / 'ratelimit.db'}"       # one box: both instances share the counter file
    gateways = []
    try:
        for name in ("a", "b"):
            gw = Gateway(tmp_path / name, mock.url, database_url=database.url, ratelimit_storage=counters,
                         env={"BOUNDLESS_KEY_CACHE_SECONDS": "1"})
            gateways.append(gw)
            gw.start()
        yield gateways
    finally:
        for gw in gateways:
            gw.stop()
        database.drop()


def models_status(gw: Gateway, key: str) -> int:
    """GET /api/v1/models on a new connection (a new connection may land on either worker)."""
    with requests.Session() as http:
        http.trust_env = False
        return http.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {key}",
                                                          "Connection": "close"}, timeout=10).status_code


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
    for round_ in range(ROUNDS):
        admin, other = pair[round_ % 2], pair[(round_ + 1) % 2]
        name = f"rev-{round_}-{uuid.uuid4().hex[:6]}"
        key = admin.create_key(name, rpm=100_000, rpd=100_000)
        for gw in pair:                              # every worker of both caches the key as valid
            assert [models_status(gw, key) for _ in range(PER_INSTANCE)] == [200] * PER_INSTANCE, gw.port
        other.cli("keys", "revoke", name)
        revoked = time.monotonic()
        late = []
        # Poll until the deadline, then once more after it: every answer after WITHIN seconds must be 401.
        while True:
            past = time.monotonic() - revoked > WITHIN
            for gw in pair:
                statuses = [models_status(gw, key) for _ in range(PER_INSTANCE)]
                assert set(statuses) <= {200, 401}, statuses
                if past and 200 in statuses:
                    late.append((gw.port, round(time.monotonic() - revoked, 2), statuses))
            if past:
                break
            time.sleep(0.1)
        assert not late, f"round {round_}: key still accepted more than {WITHIN}s after revocation: {late}"
