"""
app.store.checkpoint
~~~~~~~~~~~~~~~~~~~~

WAL checkpoints of the SQLite ledger, off the request path.

In WAL mode every commit appends pages to the ``-wal`` file; now and then a *checkpoint* copies them into the
database and, with ``synchronous=NORMAL``, fsyncs it. SQLite runs that checkpoint inside whichever commit
pushes the WAL past 1,000 pages: with a ledger write per request, one request in about a hundred waited for
an fsync of several milliseconds, and under gevent every other request of the worker waited with it (the
JSON c=1 p99 went from +5.4 ms to +3.1 ms over the upstream with the checkpoint moved away; docs/benchmarks.md).

So the ledger's connections are opened with ``wal_autocheckpoint=0`` (app/store/models.py) and each process that
writes the ledger runs one :class:`Checkpointer`: a real OS thread (also under gevent, whose patched threads
are greenlets sharing the event loop) that runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection every
:data:`INTERVAL` seconds. PASSIVE never waits for readers or writers, and sqlite3 releases the GIL while it
works, so requests go on meanwhile.

PASSIVE alone is not enough under sustained load: the WAL starts over from its beginning only when a writer
finds every frame copied, and writers that never pause always leave a few new ones, so the file (and the cost
of every read that looks pages up in it) grows without end. When a checkpoint leaves more than
:data:`RESTART_FRAMES` frames in the WAL, the thread therefore also runs a RESTART checkpoint: it takes the
write lock (writers wait for it cooperatively, app/store/sqlite_busy.py) for the little that PASSIVE left, and the
next transaction starts the WAL over.

A process whose writes never start a checkpointer (a CLI command) leaves the WAL to the server's, or to
SQLite itself when the last connection closes.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time

#: Seconds between checkpoints.
INTERVAL = 0.25
#: WAL frames (pages) above which a checkpoint also restarts the WAL (SQLite's own autocheckpoint size).
RESTART_FRAMES = 1000


def _real_thread_tools():
    """``(start_new_thread, allocate_lock, sleep)`` of the OS, not gevent's stand-ins if gevent patched them."""
    try:
        from gevent import monkey
    except ImportError:
        import _thread
        return _thread.start_new_thread, _thread.allocate_lock, time.sleep
    return (monkey.get_original("_thread", "start_new_thread"), monkey.get_original("_thread", "allocate_lock"),
            monkey.get_original("time", "sleep"))


class Checkpointer:
    """One background checkpoint thread per process and database file, started on first use.

    Fork-safe: a fork waits until no checkpoint is inside SQLite (a child forked while this thread held one of
    SQLite's mutexes would hang at its first query), and the child starts threads of its own when it writes.
    """

    def __init__(self, interval: float = INTERVAL, restart_frames: int = RESTART_FRAMES) -> None:
        self.interval = interval
        self.restart_frames = restart_frames
        self._started: set[str] = set()           # paths this process checkpoints (emptied in a forked child)
        self._lock = threading.Lock()
        self._working = None                       # an OS lock, held while a thread is inside SQLite

    def ensure(self, path: str) -> None:
        """Make sure this process checkpoints ``path`` in the background (cheap when it already does)."""
        if path in self._started:                 # no getpid() per transaction: a fork empties the set
            return
        with self._lock:
            if path in self._started:
                return
            start_new_thread, allocate_lock, sleep = _real_thread_tools()
            if self._working is None:
                self._working = allocate_lock()
                os.register_at_fork(before=self._working.acquire, after_in_parent=self._working.release,
                                    after_in_child=self._forked)
            start_new_thread(self._run, (path, sleep))
            self._started.add(path)

    def _forked(self) -> None:
        """In a new child: no thread of the parent's runs here; the child starts its own when it writes."""
        self._started.clear()
        self._working.release()

    def _run(self, path: str, sleep) -> None:
        conn = None
        failures = 0
        while True:
            sleep(self.interval)
            try:
                with self._working:
                    if conn is None:
                        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                        conn.execute("PRAGMA synchronous=NORMAL")
                        conn.execute("PRAGMA busy_timeout=1")         # see _restart
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames > self.restart_frames:
                        self._restart(conn, sleep)
                failures = 0
            except sqlite3.Error as err:
                # Not through logging: its locks may be gevent's, which belong to the event loop's thread.
                failures += 1
                if failures in (1, 100):
                    sys.stderr.write(f"boundless: WAL checkpoint of {path} failed: {err}\n")
                if conn is not None:
                    conn.close()
                    conn = None

    @staticmethod
    def _restart(conn: sqlite3.Connection, sleep, tries: int = 200) -> bool:
        """A RESTART checkpoint, tried again every ~0.5 ms while a writer holds the lock (up to ~0.3 s): between
        two requests' transactions the lock is free for a moment, and a long wait in SQLite's busy handler
        (1, 2, 5 ... ms) would keep missing it. True when the WAL will start over."""
        for _ in range(tries):
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            if not busy:
                return True
            sleep(0.0005)
        return False


CHECKPOINTS = Checkpointer()
