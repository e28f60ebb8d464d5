"""Taking SQLite's write lock with short cooperative retries instead of SQLite's busy handler."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from app.store.sqlite_busy import begin_immediate


def _connect(path):
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=7000")
    return conn


@pytest.fixture()
def pair(tmp_path):
    path = str(tmp_path / "busy.db")
    a, b = _connect(path), _connect(path)
    a.execute("CREATE TABLE t (v INTEGER)")
    yield a, b
    a.close()
    b.close()


def test_waits_for_the_other_writer_then_takes_the_lock(pair):
    a, b = pair
    a.execute("BEGIN IMMEDIATE")
    a.execute("INSERT INTO t VALUES (1)")
    released = []

    def release():
        time.sleep(0.15)
        released.append(time.monotonic())
        a.execute("COMMIT")

    threading.Thread(target=release).start()
    begin_immediate(b, timeout=5, busy_timeout_ms=7000)
    got = time.monotonic()
    b.execute("INSERT INTO t VALUES (2)")
    b.execute("COMMIT")
    assert released and got >= released[0]
    assert got - released[0] < 0.1                   # handed over within the backoff's longest step (+ noise)
    assert [v for (v,) in b.execute("SELECT v FROM t ORDER BY v")] == [1, 2]
    assert b.execute("PRAGMA busy_timeout").fetchone()[0] == 7000     # the usual timeout is back


def test_gives_up_after_the_timeout(pair):
    a, b = pair
    a.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(b, timeout=0.3, busy_timeout_ms=7000)
    assert 0.3 <= time.monotonic() - started < 2
    assert not b.in_transaction
    assert b.execute("PRAGMA busy_timeout").fetchone()[0] == 7000
    a.execute("ROLLBACK")


def test_other_errors_are_raised_at_once(pair):
    _, b = pair
    b.execute("BEGIN")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        begin_immediate(b, timeout=5, busy_timeout_ms=7000)
    assert time.monotonic() - started < 0.5
    b.execute("ROLLBACK")


def test_a_connection_kept_at_busy_timeout_0_is_left_so(pair):
    """busy_timeout_ms=None: the caller keeps the connection at 0 (the SQLite writer's own connection); the
    BEGIN still waits for the other writer, without the two PRAGMA statements around it."""
    a, b = pair
    b.execute("PRAGMA busy_timeout=0")
    a.execute("BEGIN IMMEDIATE")
    threading.Timer(0.15, lambda: a.execute("COMMIT")).start()
    started = time.monotonic()
    statements = []
    b.set_trace_callback(statements.append)
    begin_immediate(b, timeout=5, busy_timeout_ms=None)
    b.set_trace_callback(None)
    assert time.monotonic() - started >= 0.1
    assert b.in_transaction
    assert not [s for s in statements if "PRAGMA" in s.upper()]
    assert b.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    b.execute("ROLLBACK")
