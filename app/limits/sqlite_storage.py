"""
app.limits.sqlite_storage
~~~~~~~~~~~~~~~~~~~~~~~~~

A ``sqlite://`` storage for the ``limits`` library: counters in an SQLite file that every gunicorn worker of
one box shares and that survive a restart.

limits has no SQL backend; this one registers itself through limits' documented storage registry (the
``STORAGE_SCHEME`` class attribute) on import. Fixed-window counters only, which is all the gateway uses.
Each ``incr`` is one ``INSERT … ON CONFLICT … RETURNING`` statement, so one atomic write, and
:meth:`SQLiteStorage.hit_pair` counts a minute and a day window in one transaction; a negative amount gives a
hit back and never takes a counter below zero. Writes go through group commit (app/store/sqlite_writer.py): one
connection per process, and the hits a worker has queued meanwhile share one transaction. Reads use a pool of
connections per process (re-created after a fork), so threads and greenlets share a few connections rather
than opening one each.

URI: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (peewee's convention).
"""
from __future__ import annotations

import os
import queue
import random
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from limits.storage import Storage

from peewee import SqliteDatabase

from ..store.sqlite_writer import SqliteWriter

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ratelimit_counter ("
    " key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ratelimit_counter_exp ON ratelimit_counter(expires_at)",
)

_INCR = (
    "INSERT INTO ratelimit_counter(key, value, expires_at) VALUES (:key, max(:amount, 0), :now + :expiry) "
    "ON CONFLICT(key) DO UPDATE SET "
    " value = CASE WHEN ratelimit_counter.expires_at <= :now THEN max(excluded.value, 0)"
    "              ELSE max(ratelimit_counter.value + :amount, 0) END,"
    " expires_at = CASE WHEN ratelimit_counter.expires_at <= :now THEN excluded.expires_at"
    "                   ELSE ratelimit_counter.expires_at END "
    "RETURNING value")


class SQLiteStorage(Storage):
    """Fixed-window rate-limit counters in an SQLite file (WAL, busy timeout, one statement per hit)."""

    STORAGE_SCHEME = ["sqlite"]

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options) -> None:
        parsed = urlparse(uri)
        path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        if not path or path == ":memory:":
            raise ValueError("the sqlite rate-limit storage needs a file path that all workers share")
        self.path = path
        self.busy_timeout = float(options.pop("busy_timeout", 10.0))
        self.purge_probability = float(options.pop("purge_probability", 0.001))
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._pid = os.getpid()
        self._schema_ready = False
        #: Hits go through group commit (app/store/sqlite_writer.py): a worker's queued hits share one transaction.
        #: The file is WAL already (set up by _connect before the first hit); SQLite checkpoints it itself.
        self._hits = SqliteWriter(checkpoints=False)
        self._hits_db = SqliteDatabase(self.path, pragmas={"busy_timeout": int(self.busy_timeout * 1000),
                                                           "synchronous": "off"})
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception]:
        return sqlite3.Error

    def _connect(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")   # before the WAL switch needs a lock
            self._execute_retrying(conn, "PRAGMA journal_mode=WAL")
            # Counters are disposable and rewritten every request: no fsync, even at checkpoints. A process
            # crash or restart keeps every count (the OS has the pages); only an OS crash could lose the last.
            conn.execute("PRAGMA synchronous=OFF")
            if not self._schema_ready:
                for stmt in _SCHEMA:
                    self._execute_retrying(conn, stmt)
                self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    def _execute_retrying(self, conn: sqlite3.Connection, stmt: str) -> None:
        """Run a set-up statement, retrying "database is locked" until the busy timeout.

        Several workers opening a new file at once race to switch it to WAL; SQLite answers the losers
        SQLITE_BUSY at once (without calling the busy handler, to avoid a lock deadlock), so the busy
        timeout alone does not cover it.
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.execute(stmt)
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() >= deadline:
                    raise
                time.sleep(random.uniform(0.002, 0.02))

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        if self._pid != os.getpid():          # forked: the parent's connections are not ours to use
            self._pool, self._pid = queue.SimpleQueue(), os.getpid()
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        else:
            self._pool.put(conn)

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        self._ensure_schema()
        purge = random.random() < self.purge_probability

        def add(execute) -> int:
            (value,) = execute(_INCR, {"key": key, "amount": amount, "now": now, "expiry": expiry}).fetchone()
            if purge:
                execute("DELETE FROM ratelimit_counter WHERE expires_at <= ?", (now,))
            return int(value)

        return self._hits.run(self._hits_db, add)

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            with self._conn():                 # creates the file, WAL mode and the table, with retries
                pass

    def hit_pair(self, first: tuple[str, float, int], second: tuple[str, float, int]) -> tuple[int, int]:
        """Count one hit on two windows in one transaction: (key, expiry, limit) each.

        The second is counted only if the first stays within its limit; a count that went over its limit is
        given back before the commit, so no other process ever sees it. Returns the two counts as seen by this
        hit (the second is 0 when the first refused); a count over its limit means that window refused.
        """
        now = time.time()
        self._ensure_schema()

        def count(execute) -> list[int]:
            counts = []
            for key, expiry, limit in (first, second):
                (n,) = execute(_INCR, {"key": key, "amount": 1, "now": now, "expiry": expiry}).fetchone()
                counts.append(n)
                if n > limit:
                    for undo_key, undo_expiry, _ in (first, second)[:len(counts)]:
                        execute(_INCR, {"key": undo_key, "amount": -1, "now": now, "expiry": undo_expiry}).fetchall()
                    break
            return counts

        counts = self._hits.run(self._hits_db, count)
        return counts[0], counts[1] if len(counts) > 1 else 0

    def get(self, key: str) -> int:
        with self._conn() as conn:
            row = conn.execute("SELECT value FROM ratelimit_counter WHERE key = ? AND expires_at > ?",
                               (key, time.time())).fetchone()
        return int(row[0]) if row else 0

    def get_expiry(self, key: str) -> float:
        now = time.time()
        with self._conn() as conn:
            row = conn.execute("SELECT expires_at FROM ratelimit_counter WHERE key = ? AND expires_at > ?",
                               (key, now)).fetchone()
        return float(row[0]) if row else now

    def check(self) -> bool:
        try:
            with self._conn() as conn:
                conn.execute("SELECT count(*) FROM ratelimit_counter").fetchone()
            return True
        except sqlite3.Error:
            return False

    def reset(self) -> int | None:
        self._ensure_schema()
        return self._hits.run(self._hits_db, lambda execute: execute("DELETE FROM ratelimit_counter").rowcount)

    def clear(self, key: str) -> None:
        self._ensure_schema()
        self._hits.run(self._hits_db, lambda execute: execute("DELETE FROM ratelimit_counter WHERE key = ?", (key,)))
