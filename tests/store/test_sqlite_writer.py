"""app.store.sqlite_writer: the request path's SQLite writes, one connection per process, group commit.

Real SQLite files and real threads; the gevent worker's use of it is covered end to end by the billing tests
(tests/e2e/test_billing_e2e.py runs the gateway under gunicorn + gevent).
"""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from peewee import IntegrityError
from peewee import SqliteDatabase

from app.store.models import SQLITE_PRAGMAS
from app.store.sqlite_writer import SqliteWriter


@pytest.fixture
def database(tmp_path):
    path = str(tmp_path / "writer.db")
    database = SqliteDatabase(path, pragmas=SQLITE_PRAGMAS)
    database.execute_sql("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    database.execute_sql("CREATE TABLE total (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    database.execute_sql("INSERT INTO total VALUES (1, 0)")
    database.close()
    return database


def _rows(database) -> dict:
    return dict(database.execute_sql("SELECT k, v FROM t").fetchall())


def _insert(k: str, v: int):
    def op(execute):
        execute("INSERT INTO t (k, v) VALUES (?, ?)", (k, v))
        execute("UPDATE total SET n = n + ? WHERE id = 1", (v,))
        return execute("SELECT n FROM total WHERE id = 1").fetchone()[0]
    return op


def test_a_lone_operation_is_one_transaction(database):
    writer = SqliteWriter()
    assert writer.run(database, _insert("a", 5)) == 5
    assert writer.run(database, _insert("b", 7)) == 12
    assert (writer.commits, writer.operations) == (2, 2)
    assert _rows(database) == {"a": 5, "b": 7}


def test_another_process_holding_the_lock_is_waited_for_without_busy_handler(database):
    """The writer's connection never uses SQLite's busy handler (busy_timeout 0, no PRAGMA per transaction):
    a write lock held elsewhere (here another connection, as another worker process would) is waited for by
    begin_immediate's short retries, and the operation then commits."""
    writer = SqliteWriter()
    writer.run(database, _insert("a", 1))               # opens the writer's connection
    other = sqlite3.connect(database.database, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t (k, v) VALUES ('other', 2)")
    threading.Timer(0.2, lambda: other.execute("COMMIT")).start()
    statements: list[str] = []
    writer._conn.set_trace_callback(statements.append)
    started = time.monotonic()
    assert writer.run(database, _insert("b", 3)) == 4
    assert time.monotonic() - started >= 0.15
    assert not [s for s in statements if "PRAGMA" in s.upper()]
    assert writer._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    assert _rows(database) == {"a": 1, "other": 2, "b": 3}
    other.close()


def test_operations_queued_behind_a_transaction_share_the_next_one(database):
    """While one transaction runs, 20 more writers queue; they are committed together, each with its result."""
    writer = SqliteWriter()
    inside, release = threading.Event(), threading.Event()

    def slow(execute):                         # holds the first transaction open until the others queued
        execute("INSERT INTO t (k, v) VALUES ('first', 1)")
        inside.set()
        release.wait(10)
        return "first"

    results: dict[str, object] = {}
    first = threading.Thread(target=lambda: results.update(first=writer.run(database, slow)))
    first.start()
    assert inside.wait(10)
    others = [threading.Thread(target=lambda i=i: results.update({f"k{i}": writer.run(database, _insert(f"k{i}", 1))}))
              for i in range(20)]
    for t in others:
        t.start()
    while len(writer._queue) < 20:             # every one of them has queued its operation
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert results["first"] == "first"
    assert sorted(results[f"k{i}"] for i in range(20)) == list(range(1, 21))   # each saw the ones before it
    assert (writer.commits, writer.operations) == (2, 21)
    assert len(_rows(database)) == 21
    assert database.execute_sql("SELECT n FROM total").fetchone()[0] == 20


def test_a_failing_operation_fails_alone(database):
    """An operation that fails rolls back the batch; the others commit without it, each once."""
    writer = SqliteWriter()
    writer.run(database, _insert("taken", 1))
    inside, release = threading.Event(), threading.Event()

    def hold(execute):
        inside.set()
        release.wait(10)

    outcome: dict[str, object] = {}

    def run(name, op):
        try:
            outcome[name] = writer.run(database, op)
        except Exception as err:
            outcome[name] = err

    threads = [threading.Thread(target=run, args=("hold", hold))]
    threads[0].start()
    assert inside.wait(10)
    for name, op in (("ok1", _insert("x", 10)), ("dup", _insert("taken", 100)), ("ok2", _insert("y", 20))):
        threads.append(threading.Thread(target=run, args=(name, op)))
        threads[-1].start()
        while len(writer._queue) < len(threads) - 1:
            threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert isinstance(outcome["dup"], IntegrityError)
    assert (outcome["ok1"], outcome["ok2"]) == (11, 31)
    assert _rows(database) == {"taken": 1, "x": 10, "y": 20}
    assert database.execute_sql("SELECT n FROM total").fetchone()[0] == 31    # the failed one added nothing


def test_many_threads_in_two_writers_lose_nothing(database):
    """Two writers (as two worker processes would have) on one file, 8 threads each: every increment lands once."""
    writers = [SqliteWriter(), SqliteWriter()]
    errors: list[BaseException] = []

    def work(writer, t):
        try:
            for i in range(50):
                writer.run(database, _insert(f"{id(writer)}-{t}-{i}", 1))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w, t)) for w in writers for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert database.execute_sql("SELECT n FROM total").fetchone()[0] == 800
    assert len(_rows(database)) == 800
    assert sum(w.operations for w in writers) == 800


def test_the_leader_yields_only_under_gevent():
    """Under gevent a yield is one turn of the loop that lets ready requests join the batch; with OS threads it
    would hand the GIL away for up to 5 ms, so threads never yield (they queue behind a transaction anyway)."""
    import subprocess
    import sys

    from app.store.sqlite_writer import _cooperative
    assert _cooperative() is False                       # this test process: plain threads
    code = ("from gevent import monkey; monkey.patch_all()\n"
            "from app.store.sqlite_writer import _cooperative\n"
            "print(_cooperative())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
