"""
app.store.sqlite_writer
~~~~~~~~~~~~~~~~~~~~~~~

The request path's writes to SQLite (the ledger; the rate-limit counters, on their own file and writer): one
connection per process, and group commit.

Every gunicorn worker writes the same SQLite file, and SQLite lets one writer at a time in. A process's
writers therefore queue on one Python lock (SQLite's own busy handler would sleep 1–10 ms between tries, far
longer than the lock is held; app/store/sqlite_busy.py waits for the other *processes* cooperatively). Since they
queue anyway:

* they share one plain ``sqlite3`` connection: no pool check-out, no per-greenlet connection state, prepared
  statements stay prepared, and its page cache stays valid while no other process writes;
* **group commit**: a writer hands its work in as an *operation* (a function of ``execute``) and queues for the
  lock; whoever gets the lock first yields once under gevent (one turn of the loop), so that the other
  requests that are ready to run queue their operations behind it, then runs every operation queued by then in one
  transaction, one ``BEGIN IMMEDIATE`` and one ``COMMIT``. Under load that is several requests per
  transaction (2–3 on average at 64 clients in the benchmark): fewer hand-offs of SQLite's lock between the
  workers, and each page written to the WAL once per batch instead of once per request. A lone request is a
  batch of one; it waits for one turn of the loop and for nobody.

Each operation sees exactly the effects of its own transaction's earlier operations, as if it ran alone after
them, and its caller returns only once the transaction that holds its writes has committed. If an operation
fails, the batch is rolled back and each operation runs again in a transaction of its own, so a failure stays
with the request that caused it. Operations must therefore only run SQL (and compute their result from it):
they may run more than once, and only the committed run's result is returned.

Connection and lock are made anew in a forked child: a parent's SQLite connection must never be used there.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import deque
from typing import Callable
from typing import TypeVar

from peewee import SqliteDatabase
from peewee import __exception_wrapper__

from .checkpoint import CHECKPOINTS
from .sqlite_busy import begin_immediate

T = TypeVar("T")
Execute = Callable[..., sqlite3.Cursor]

#: Most operations committed in one transaction (bounds the wait of the first one in a long queue).
MAX_BATCH = 128


class _Ticket:
    __slots__ = ("op", "done", "abandoned", "result", "error")

    def __init__(self, op: Callable[[Execute], T]) -> None:
        self.op, self.done, self.abandoned, self.result, self.error = op, False, False, None, None


class SqliteWriter:
    """This process's write path to one SQLite database at a time (see the module's docstring)."""

    def __init__(self, checkpoints: bool = True) -> None:
        #: Start app/store/checkpoint.py's thread for the file (its connections then need ``wal_autocheckpoint=0``).
        self.checkpoints = checkpoints
        self._lock: threading.RLock | None = None
        self._gather = False
        self._conn: sqlite3.Connection | None = None
        self._path: str | None = None
        self._busy_ms = 10_000
        self._queue: deque[_Ticket] = deque()
        #: Transactions committed and operations they held, for the tests and the benchmark's notes.
        self.commits = self.operations = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = self._conn = self._path = None
        self._queue = deque()

    @property
    def lock(self) -> threading.RLock:
        if self._lock is None:                 # made lazily: after gevent has patched threading
            self._lock = threading.RLock()
            self._gather = _cooperative()
        return self._lock

    def run(self, database: SqliteDatabase, op: Callable[[Execute], T]) -> T:
        """Run ``op(execute)`` in a committed write transaction, possibly shared with other operations.

        :raise peewee.PeeweeException: the database failed (for this operation, or for the whole batch).
        """
        if self.checkpoints:
            CHECKPOINTS.ensure(database.database)
        ticket = _Ticket(op)
        self._queue.append(ticket)
        lock = self.lock
        try:
            lock.acquire()
        except BaseException:                  # interrupted while queueing: a holder that has not started it
            ticket.abandoned = True            # leaves it out
            raise
        try:
            if self._gather and not ticket.done:   # we lead: let the greenlets that are ready queue first
                time.sleep(0)                          # (gevent's sleep: one turn of the loop)
            while not ticket.done:             # else the lock's previous holder committed ours with its own
                batch = [t for t in (self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH)))
                         if not t.abandoned]
                try:
                    self._commit(database, batch)
                except BaseException:          # interrupted (a greenlet killed, a signal): others are kept,
                    for other in reversed(batch):          # ours is dropped: its caller has given up on it
                        if not other.done and other is not ticket:
                            self._queue.appendleft(other)
                    if ticket in self._queue:
                        self._queue.remove(ticket)
                    ticket.done = True
                    raise
        finally:
            lock.release()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def _commit(self, database: SqliteDatabase, batch: list[_Ticket]) -> None:
        try:
            results = self._transaction(database, [t.op for t in batch])
        except Exception as err:
            if len(batch) == 1:
                batch[0].error, batch[0].done = err, True
                return
            for ticket in batch:               # a failure stays with the operation that caused it
                self._commit(database, [ticket])
            return
        for ticket, result in zip(batch, results):
            ticket.result, ticket.done = result, True

    def _transaction(self, database: SqliteDatabase, ops: list[Callable[[Execute], T]]) -> list[T]:
        with __exception_wrapper__:
            conn = self._connection(database)
            begin_immediate(conn, self._busy_ms / 1000, None)
            try:
                results = [op(conn.execute) for op in ops]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        self.commits += 1
        self.operations += len(ops)
        return results

    def _connection(self, database: SqliteDatabase) -> sqlite3.Connection:
        """The connection to ``database`` (with :attr:`lock` held), with the database's pragmas."""
        if self._conn is None or self._path != database.database:
            if self._conn is not None:
                self._conn.close()
                self._conn = self._path = None
            conn = sqlite3.connect(database.database, isolation_level=None, check_same_thread=False)
            pragmas = dict(database._pragmas)
            for name, value in pragmas.items():
                conn.execute(f"PRAGMA {name}={value}")
            # This connection only runs BEGIN IMMEDIATE transactions, whose BEGIN begin_immediate() retries
            # itself: SQLite's busy handler is never wanted on it. The database's busy_timeout is how long
            # BEGIN waits for the other processes.
            conn.execute("PRAGMA busy_timeout=0")
            self._conn, self._path = conn, database.database
            self._busy_ms = int(pragmas.get("busy_timeout", 10_000))
        return self._conn


def _cooperative() -> bool:
    """Whether this process runs on gevent (the shipped worker): only there is a yield one cheap turn of the
    loop. With OS threads ``time.sleep(0)`` gives the GIL away for up to the switch interval (5 ms) while other
    threads run, and they queue behind a running transaction anyway."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("time")


WRITER = SqliteWriter()
