"""
app.upstream.streams
~~~~~~~~~~~~~~~~~~~~

The streams a worker process is relaying right now.

Two things need them: the open-streams gauge, and a graceful stop. On SIGTERM gunicorn waits
``graceful_timeout`` for requests to finish and then kills the worker, which would skip every stream's
``finally`` (no settlement, no log line). :meth:`OpenStreams.cut_all` shuts the upstream sockets down
just before that deadline instead, so each stream ends through its normal error path: one SSE error event
to the caller, then settle and log.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Callable

from .client import shutdown

log = logging.getLogger("boundless")


class OpenStreams:
    """The upstream responses this process is relaying, each with its caller's socket.

    A caller who hangs up is normally noticed at the next write, but an upstream can be silent for minutes
    (reasoning models think before the first token) while the provider keeps generating and billing. A
    watcher thread (one per process, alive only while streams are open) therefore peeks at the callers'
    sockets every :attr:`interval` seconds and, at EOF, shuts the upstream socket down: the relay then ends
    at once, as a hang-up.
    """

    interval = 1.0

    def __init__(self) -> None:
        self._items: dict = {}                  # upstream response -> caller socket (or None)
        self._ended: dict = {}                  # response -> why we cut it: "client_closed" | "shutdown"
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        #: Called with +1 / -1 when a stream opens / closes (metrics hook in here).
        self.listeners: list[Callable[[int], None]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, resp, client_socket=None) -> None:
        with self._lock:
            self._items[resp] = client_socket
            if client_socket is not None and (self._watcher is None or not self._watcher.is_alive()):
                self._watcher = threading.Thread(target=self._watch, name="boundless-hangups", daemon=True)
                self._watcher.start()
        for listener in self.listeners:
            listener(1)

    def discard(self, resp) -> None:
        """Forget a finished stream."""
        with self._lock:
            if resp not in self._items:
                return False
            del self._items[resp]
            self._ended.pop(resp, None)
        for listener in self.listeners:
            listener(-1)

    def cut_reason(self, resp) -> str | None:
        """Why the gateway itself cut this stream's upstream, if it did."""
        return self._ended.get(resp)

    def cut_all(self) -> int:
        """Shut down the upstream socket of every open stream; return how many were cut."""
        with self._lock:
            items = list(self._items)
            for resp in items:
                self._ended.setdefault(resp, "shutdown")
        for resp in items:
            shutdown(resp)
        if items:
            log.warning("graceful stop: cut %d open stream(s) at the deadline", len(items))
        return len(items)

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                watched = {sock: resp for resp, sock in self._items.items()
                           if sock is not None and resp not in self._ended}
                if not self._items:
                    self._watcher = None
                    return
            for sock in hung_up(list(watched)):
                resp = watched[sock]
                with self._lock:
                    self._ended.setdefault(resp, "client_closed")
                shutdown(resp)


def _original_poll():
    """The operating system's ``select.poll``, even where gevent has patched it: with a zero timeout it never
    blocks, and gevent's stand-in would need a turn of the event loop to see anything. (Not ``select``: a busy
    worker's descriptors pass its limit of 1,024.)"""
    try:
        from gevent.monkey import get_original
    except ImportError:
        return select.poll
    return get_original("select", "poll")


_poll = _original_poll()
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def hung_up(socks: list) -> list:
    """The sockets whose peer has closed: one ``poll`` for all of them (no FD_SETSIZE limit, unlike
    ``select``: a busy worker's descriptors pass 1,024), then a peek at each readable one, where EOF means gone
    (data does not: a client may send its next request early)."""
    poller = _poll()
    by_fd = {}
    gone = []
    for sock in socks:
        try:
            fd = sock.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd < 0:
            gone.append(sock)
            continue
        by_fd[fd] = sock
        poller.register(fd, select.POLLIN | select.POLLPRI)
    for fd, events in poller.poll(0):
        sock = by_fd[fd]
        if events & _GONE and not events & select.POLLIN:
            gone.append(sock)
            continue
        try:
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                gone.append(sock)
        except BlockingIOError:
            pass
        except OSError:          # reset by the peer
            gone.append(sock)
    return gone
