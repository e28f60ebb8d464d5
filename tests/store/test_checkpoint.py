"""app.store.checkpoint: the ledger's WAL is checkpointed by a background thread, not inside requests' commits."""
from __future__ import annotations

import os
import sqlite3
import time

from app.store.checkpoint import Checkpointer
from app.store.models import SQLITE_PRAGMAS


def _writer(path):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA wal_autocheckpoint={SQLITE_PRAGMAS['wal_autocheckpoint']}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (v BLOB)")
    return conn


def _write(conn, n):
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (randomblob(3000))")
        conn.execute("COMMIT")


def test_requests_commits_never_checkpoint_themselves(tmp_path):
    path = str(tmp_path / "ledger.db")
    conn = _writer(path)
    _write(conn, 200)
    first = os.path.getsize(path + "-wal")
    _write(conn, 200)
    assert os.path.getsize(path + "-wal") > 1.8 * first      # no checkpoint: the WAL only grows


def test_the_background_thread_keeps_the_wal_from_growing(tmp_path):
    path = str(tmp_path / "ledger.db")
    conn = _writer(path)
    Checkpointer(interval=0.05).ensure(path)
    _write(conn, 200)
    time.sleep(0.5)                   # several checkpoints; the next commit starts the WAL over
    first = os.path.getsize(path + "-wal")
    for _ in range(4):
        _write(conn, 100)
        time.sleep(0.3)
    assert os.path.getsize(path + "-wal") < 1.5 * first, (first, os.path.getsize(path + "-wal"))
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 600
    # What was checkpointed is in the database file itself: a reader that ignores the WAL sees it (while the
    # writer is still open: closing the last connection would checkpoint by itself).
    check = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] >= 500
    check.close()
    conn.close()


def test_one_thread_per_process_and_file(tmp_path):
    cp = Checkpointer(interval=0.05)
    path = str(tmp_path / "x.db")
    _writer(path).close()
    cp.ensure(path)
    cp.ensure(path)
    assert cp._started == {path}


def test_forking_while_the_thread_checkpoints_is_safe(tmp_path):
    """A fork never lands while the thread is inside SQLite (the child would hang on SQLite's mutex)."""
    import multiprocessing

    path = str(tmp_path / "forked.db")
    conn = _writer(path)
    Checkpointer(interval=0.0005).ensure(path)
    ctx = multiprocessing.get_context("fork")
    for _ in range(40):
        _write(conn, 3)
        child = ctx.Process(target=_child_query, args=(path,))
        child.start()
        child.join(20)
        assert child.exitcode == 0
    conn.close()


def _child_query(path):
    c = sqlite3.connect(path)
    c.execute("SELECT count(*) FROM t").fetchone()
    c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    c.close()


def test_writers_that_never_pause_do_not_grow_the_wal_forever(tmp_path):
    """PASSIVE checkpoints alone never let the WAL start over while commits keep coming; RESTART does."""
    path = str(tmp_path / "busy.db")
    conn = _writer(path)
    Checkpointer(interval=0.02, restart_frames=200).ensure(path)
    deadline = time.monotonic() + 2.0
    written = 0
    while time.monotonic() < deadline:
        _write(conn, 1)
        written += 1
        time.sleep(0.0002)            # a request's own I/O between its transactions
    wal = os.path.getsize(path + "-wal")
    # Each commit appends at least one 4 KiB page for its 3,000-byte row: a WAL that never started over
    # would hold them all.
    assert written > 500
    assert wal < 0.5 * written * 4096, (wal, written)
    conn.close()
