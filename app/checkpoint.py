"""
app.checkpoint
~~~~~~~~~~~~~~

WAL checkpoints of the SQLite ledger, off the request path.

In WAL mode every commit appends pages to the ``-wal`` file; now and then a *checkpoint* copies them into the
database and, with ``synchronous=NORMAL``, fsyncs it. SQLite runs that checkpoint inside whichever commit
pushes the WAL past 1,000 pages: with a ledger write per request, one request in about a hundred waited for
an fsync of several milliseconds, and under gevent every other request of the worker waited with it (the
JSON c=1 p99 went from +5.4 ms to +3.1 ms over the upstream with the checkpoint moved away; docs/benchmarks.md).

So the ledger's connections are opened with ``wal_autocheckpoint=0`` (app/models.py) and each process that
writes the ledger runs one :class:`Checkpointer`: a real OS thread (also under gevent, whose patched threads
are greenlets sharing the event loop) that runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection every
:data:`INTERVAL` seconds. PASSIVE never waits for readers or writers, and sqlite3 releases the GIL while it
works, so requests go on meanwhile. A process whose writes never start one (a CLI command) leaves the WAL to
the server's checkpointer, or to SQLite itself when the last connection closes.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time

#: Seconds between checkpoints: the WAL holds at most about this long's worth of commits.
INTERVAL = 0.25


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

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._started: dict[str, int] = {}        # path -> pid that started a thread for it
        self._lock = threading.Lock()
        self._working = None                       # an OS lock, held while a thread is inside SQLite

    def ensure(self, path: str) -> None:
        """Make sure this process checkpoints ``path`` in the background (cheap when it already does)."""
        if self._started.get(path) == os.getpid():
            return
        with self._lock:
            if self._started.get(path) == os.getpid():
                return
            start_new_thread, allocate_lock, sleep = _real_thread_tools()
            if self._working is None:
                self._working = allocate_lock()
                os.register_at_fork(before=self._working.acquire, after_in_parent=self._working.release,
                                    after_in_child=self._working.release)
            start_new_thread(self._run, (path, sleep))
            self._started[path] = os.getpid()

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
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                failures = 0
            except sqlite3.Error as err:
                # Not through logging: its locks may be gevent's, which belong to the event loop's thread.
                failures += 1
                if failures in (1, 100):
                    sys.stderr.write(f"boundless: WAL checkpoint of {path} failed: {err}\n")
                if conn is not None:
                    conn.close()
                    conn = None


CHECKPOINTS = Checkpointer()
