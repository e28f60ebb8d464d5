"""
app.streams
~~~~~~~~~~~

The streams a worker process is relaying right now.

Two things need them: the open-streams gauge, and a graceful stop. On SIGTERM gunicorn waits
``graceful_timeout`` for requests to finish and then kills the worker, which would skip every stream's
``finally`` (no settlement, no log line). :meth:`OpenStreams.cut_all` shuts the upstream sockets down
just before that deadline instead, so each stream ends through its normal error path: one SSE error event
to the caller, then settle and log.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

log = logging.getLogger("boundless")


class OpenStreams:
    """A thread-safe set of the upstream responses being relayed by this process."""

    def __init__(self) -> None:
        self._items: set = set()
        self._lock = threading.Lock()
        #: Called with +1 / -1 when a stream opens / closes (metrics hook in here).
        self.listeners: list[Callable[[int], None]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, resp) -> None:
        with self._lock:
            self._items.add(resp)
        for listener in self.listeners:
            listener(1)

    def discard(self, resp) -> None:
        with self._lock:
            if resp not in self._items:
                return
            self._items.discard(resp)
        for listener in self.listeners:
            listener(-1)

    def cut_all(self) -> int:
        """Shut down the upstream socket of every open stream; return how many were cut."""
        with self._lock:
            items = list(self._items)
        for resp in items:
            try:
                resp.raw.connection.sock.shutdown(socket.SHUT_RDWR)
            except (AttributeError, OSError):     # already closed or never connected
                pass
        if items:
            log.warning("graceful stop: cut %d open stream(s) at the deadline", len(items))
        return len(items)
