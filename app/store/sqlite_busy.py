"""
app.store.sqlite_busy
~~~~~~~~~~~~~~~~~~~~~

Taking SQLite's write lock without SQLite's busy handler.

Every gunicorn worker writes the same SQLite files (ledger, rate-limit counters), so a ``BEGIN IMMEDIATE``
often finds another process holding the write lock for the few dozen microseconds of its transaction.
SQLite's own busy handler then sleeps 1, 2, 5, 10 ... ms in C between tries: far longer than the lock is
held, and under the gevent worker that sleep blocks the whole process, every other request and stream with
it. Here the lock is tried without waiting and retried after short sleeps that start at 50 µs, through
``time.sleep`` (which gevent makes cooperative, and which releases the GIL under threads).

Only the ``BEGIN`` can be refused for a lock in WAL mode: once it is taken, the transaction's statements and its
``COMMIT`` never wait for other writers, and readers never wait at all.
"""
from __future__ import annotations

import random
import sqlite3
import time

#: Sleeps between tries (seconds); the last one repeats, with jitter, until the timeout.
_BACKOFF = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002)


def begin_immediate(conn: sqlite3.Connection, timeout: float, busy_timeout_ms: int | None) -> None:
    """``BEGIN IMMEDIATE`` on ``conn``, retried while another process holds the lock, for up to ``timeout`` s.

    ``busy_timeout_ms`` is the connection's usual busy timeout: it is set to 0 for the ``BEGIN`` and restored
    afterwards. ``None`` means the connection's busy timeout is 0 already and stays so (a connection that only
    ever runs ``BEGIN IMMEDIATE`` transactions: app/store/sqlite_writer.py), which saves two statements.

    :raise sqlite3.OperationalError: "database is locked" after ``timeout``, or any other error at once.
    """
    if busy_timeout_ms is None:
        _begin(conn, timeout)
        return
    conn.execute("PRAGMA busy_timeout=0")
    try:
        _begin(conn, timeout)
    finally:
        conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")


def _begin(conn: sqlite3.Connection, timeout: float) -> None:
    deadline = None
    tries = 0
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as err:
            if not _is_busy(err):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            elif now >= deadline:
                raise
        pause = _BACKOFF[min(tries, len(_BACKOFF) - 1)]
        tries += 1
        time.sleep(pause * random.uniform(0.5, 1.5))


def _is_busy(err: sqlite3.OperationalError) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_BUSY
    return "locked" in str(err)
