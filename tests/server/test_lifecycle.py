"""app.server.lifecycle: settling a dead worker's held requests while other processes keep writing.

Real SQLite files; the "other worker" is a second connection committing in a loop from a thread, as a live
worker of the same gateway does. (tests/e2e/test_worker_loss.py kills a real worker under load.)
"""
from __future__ import annotations

import sqlite3
import threading

import pytest

from app.server.lifecycle import settle_owner
from app.store import schema
from app.store.models import ApiKey
from app.store.models import CreditEntry
from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from app.store.models import utcnow

HELD = 60
RESERVED = 1_000


@pytest.fixture
def sqlite_db(tmp_path):
    path = tmp_path / "boundless.db"
    db.initialize(make_database(f"sqlite:///{path}"))
    with db.connection_context():
        schema.create()
    yield path
    db.close_all()


class Committer:
    """Another process's worker: a separate connection committing a small write transaction in a loop."""

    def __init__(self, path) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None, timeout=10, check_same_thread=False)
        self.stop = threading.Event()
        self.commits = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.conn.execute("INSERT INTO heartbeat (owner, seen_at) VALUES ('live:2', ?) "
                              "ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at", (str(utcnow()),))
            self.commits += 1
            self.stop.wait(0.0002)

    def __enter__(self) -> "Committer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        self.conn.close()


def test_settle_owner_while_another_worker_commits(sqlite_db):
    with db.connection_context():
        key = ApiKey.create(name="k", key_hash="h" * 64, prefix="sk-x", balance=0)
        CreditEntry.create(key=key, amount=HELD * RESERVED, kind="open")
        Usage.insert_many([{"request_id": f"req_{i}", "key": key.id, "model": "paid-model", "reserved": RESERVED,
                            "owner": "dead:1"} for i in range(HELD)]).execute()
        Usage.create(request_id="req_live", key=key.id, model="paid-model", reserved=0, owner="live:2")
    with Committer(sqlite_db) as other, db.connection_context():
        settled = settle_owner("dead:1")
    assert other.commits > 0
    assert settled == HELD
    with db.connection_context():
        assert ApiKey.get_by_id(key.id).balance == HELD * RESERVED          # every reservation given back
        rows = list(Usage.select().where(Usage.owner == "dead:1"))
        assert {(r.state, r.charge, r.outcome) for r in rows} == {("settled", 0, "worker_lost")}
        assert Usage.get(Usage.request_id == "req_live").state == "held"    # a live worker's row is left alone
