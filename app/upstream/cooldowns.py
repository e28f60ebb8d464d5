"""
app.upstream.cooldowns
~~~~~~~~~~~~~~~~~~~~~~

Which provider keys and routes are cooling down (skipped after a failure), shared through the rate-limit
storage so that every worker and instance on it sees them.

Each cool-down is one entry of the ``limits`` storage whose expiry is the end of the cool-down:
``cooldown/<provider>/<key variable>`` for a key, ``cooldown/route/<provider>/<upstream model>`` for a route.
Setting one also bumps ``cooldown/epoch``.

The request path must not pay for this when nothing fails, so each process keeps the state in memory and
reads the storage at most once per :data:`REFRESH_SECONDS`: only the epoch, and every known entry only when
the epoch moved (another worker or instance set a cool-down). A process knows its own failures at once. With
``memory://`` the storage is per process, and so are the cool-downs.

The storage is an optimisation here, never a reason to fail a request: when it is unreachable, the process
goes on with what it knows.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable
from typing import Iterable

from limits.storage import Storage

log = logging.getLogger("boundless")

#: Longest time a process goes without looking at the shared cool-downs.
REFRESH_SECONDS = 1.0

_EPOCH = "cooldown/epoch"
_EPOCH_EXPIRY = 86_400


def key_entry(provider: str, key_env: str | None) -> str:
    return f"cooldown/{provider}/{key_env or '-'}"


def route_entry(provider: str, upstream_model: str) -> str:
    return f"cooldown/route/{provider}/{upstream_model}"


class Cooldowns:
    """The cool-downs of one process, backed by a ``limits`` storage (None: this process only).

    ``entries`` are every entry the catalogue can have; only those are read back from the storage.
    """

    def __init__(self, storage: Storage | None, entries: Iterable[str] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.entries = tuple(entries)
        self.clock = clock
        self._until: dict[str, float] = {}
        self._next_refresh = 0.0
        self._epoch: int | None = None
        self._lock = threading.Lock()
        #: (entry -> last error text) of this process's last failure per entry, cleared by a success.
        self.last_error: dict[str, str] = {}

    # ------------------------------------------------------------------ reading (the request path)

    def active(self) -> dict[str, float]:
        """{entry: until} of the cool-downs in force now (refreshed from the storage at most once a second).

        The dict is shared: read it, never change it.
        """
        now = time.monotonic()
        if now >= self._next_refresh:
            self._refresh(now)
        until = self._until
        if until:
            wall = self.clock()
            if any(t <= wall for t in until.values()):
                self._until = until = {e: t for e, t in until.items() if t > wall}
        return until

    def _refresh(self, now: float) -> None:
        self._next_refresh = now + REFRESH_SECONDS
        if self.storage is None:
            return
        try:
            epoch = int(self.storage.get(_EPOCH) or 0)
            if epoch == self._epoch:
                return
            wall = self.clock()
            found = {}
            for entry in self.entries:
                if self.storage.get(entry):
                    until = float(self.storage.get_expiry(entry))
                    if until > wall:
                        found[entry] = until
            with self._lock:
                merged = {e: t for e, t in self._until.items() if t > wall}
                for entry, until in found.items():
                    merged[entry] = max(until, merged.get(entry, 0.0))
                self._until = merged
            self._epoch = epoch
        except Exception as err:          # any storage's failure: go on with what this process knows
            log.warning("could not read the shared cool-downs: %s", err)

    # ------------------------------------------------------------------ writing (after a failure)

    def cool(self, entry: str, seconds: float, error: str = "") -> float:
        """Skip ``entry`` for ``seconds`` from now (never shortening a longer cool-down); return its end."""
        if error:
            self.last_error[entry] = error
        if seconds <= 0:
            return self.clock()
        until = self.clock() + seconds
        with self._lock:
            merged = dict(self._until)
            if merged.get(entry, 0.0) >= until:
                return merged[entry]
            merged[entry] = until
            self._until = merged
        if self.storage is not None:
            self._share(entry, seconds, until)
        return until

    def _share(self, entry: str, seconds: float, until: float) -> None:
        try:
            if self.storage.get(entry) and float(self.storage.get_expiry(entry)) >= until - 1:
                return
            # An entry's expiry is set when it is created: a longer cool-down replaces the entry.
            self.storage.clear(entry)
            self.storage.incr(entry, math.ceil(seconds))
            self.storage.incr(_EPOCH, _EPOCH_EXPIRY)
        except Exception as err:
            log.warning("could not share the cool-down %s: %s", entry, err)

    def succeeded(self, entry: str) -> None:
        """This process's last call through ``entry`` worked (it is no longer ``failing``)."""
        if self.last_error:
            self.last_error.pop(entry, None)
