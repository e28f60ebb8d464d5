"""
app.limits.parallel
~~~~~~~~~~~~~~~~~~~

At most ``max_parallel`` requests of a key in flight at once, counted across workers and gateways on the
rate-limit storage, and freed within a minute when a worker dies with its slots (kill -9).

The storage only offers counters with an expiry (``limits``: increment, read). A plain counter per key would
keep a dead worker's slots for ever, and one whose expiry live requests refresh would keep them as long as the key
is busy. So the count is kept in time **epochs** of :data:`EPOCH` seconds, one counter per key and epoch
(``boundless/<key>/p/<epoch>``), and each slot is a mark in exactly one of them:

* **acquire**: read the previous epoch's counter, then increment the current one; the key has
  ``previous + current`` requests in flight, this one included. Over the cap, the increment is given back and the
  request refused (429 ``too_many_parallel_requests``).
* **renew**: a thread in each worker moves the marks of its live slots into each new epoch as it begins
  (increment the new counter, *then* take one from the old one), every :data:`RENEW_EVERY` seconds.
* **release**: take the mark back from the counter it is in, once, when the request ends in any way.

Reading the previous epoch before incrementing the current one, and moving by increment-then-decrement, means
every live slot is in at least one of the two counters an acquirer adds up, whatever interleaves: the cap is
never exceeded (a slot in the middle of its move is counted twice for that instant, which can only refuse).
A dead worker's marks are never moved: they sit in the epoch they were in, which stops being counted two epoch
starts later, so its slots are free within ``2 x EPOCH`` seconds.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Callable

from ..errors import TooManyParallel
from ..text import plural
from .ratelimit import RateLimiter

log = logging.getLogger("boundless")

#: Seconds per epoch: a dead worker's slots are free again after at most twice this.
EPOCH = 25.0
#: How often each worker moves its live slots into the current epoch (much less than EPOCH).
RENEW_EVERY = 2.0
#: An epoch's counter lives this long after its first increment: long past the last mark it can hold.
EXPIRY = 3 * EPOCH + 5


class Slot:
    """One request's place among its key's ``max_parallel``: which epoch's counter holds its mark."""

    __slots__ = ("key_id", "epoch", "released", "lock")

    def __init__(self, key_id: int, epoch: int) -> None:
        self.key_id = key_id
        self.epoch = epoch
        self.released = False
        self.lock = threading.Lock()


class ParallelSlots:
    """The slots of every key, on the rate limiter's storage; one per process, with its renewal thread."""

    def __init__(self, limiter: RateLimiter, clock: Callable[[], float] = time.time) -> None:
        self.limiter = limiter
        self.clock = clock
        self._live: set[Slot] = set()
        self._lock = threading.Lock()
        self._renewer_pid = 0
        self._closed = threading.Event()

    @staticmethod
    def counter(key_id: int, epoch: int) -> str:
        return f"boundless/{key_id}/p/{epoch}"

    def acquire(self, key_id: int, limit: int) -> Slot:
        """Take one of the key's ``limit`` slots for a request; release it with :meth:`release` when it ends.

        :raise TooManyParallel: 429, the key has ``limit`` requests in flight; nothing is held.
        :raise ServiceUnavailable: the storage is unreachable (fail closed, as the rate limiter does).
        """
        epoch = int(self.clock() // EPOCH)
        current = self.counter(key_id, epoch)
        try:
            before = self.limiter.storage.get(self.counter(key_id, epoch - 1))    # first: see the module's why
            now = self.limiter.count_up(current, EXPIRY)
            over = before + now > limit
            if over:
                self.limiter.count_down(current, EXPIRY)
        except Exception as err:
            raise self.limiter.unavailable(err) from err
        if over:
            raise TooManyParallel(f"Too many parallel requests: this key may have {plural(limit, 'request')} "
                                  f"in flight at once, and has {limit}. Retry when one of them has ended.")
        slot = Slot(key_id, epoch)
        with self._lock:
            self._live.add(slot)
        self._ensure_renewer()
        return slot

    def release(self, slot: Slot) -> None:
        """Give the slot back, once (later calls do nothing); never raises: a mark that cannot be taken back
        stops counting within two epochs."""
        with slot.lock:
            if slot.released:
                return
            slot.released = True
            with self._lock:
                self._live.discard(slot)
            if slot.epoch < int(self.clock() // EPOCH) - 1:
                return              # its counter no longer counts (and may be gone): nothing to take back
            try:
                self.limiter.count_down(self.counter(slot.key_id, slot.epoch), EXPIRY)
            except Exception:
                log.exception("could not release a parallel slot of key %s; it frees itself within %ds",
                              slot.key_id, math.ceil(2 * EPOCH))

    def renew(self) -> int:
        """Move this process's live slots into the current epoch; return how many moved."""
        epoch = int(self.clock() // EPOCH)
        with self._lock:
            stale = [s for s in self._live if s.epoch < epoch]
        moved = 0
        for slot in stale:
            with slot.lock:
                if slot.released or slot.epoch >= epoch:
                    continue
                try:
                    self.limiter.count_up(self.counter(slot.key_id, epoch), EXPIRY)
                except Exception:
                    log.exception("could not renew a parallel slot of key %s", slot.key_id)
                    continue
                old, slot.epoch = slot.epoch, epoch
                moved += 1
                if old >= epoch - 1:            # an older counter no longer counts: leave it to expire
                    try:
                        self.limiter.count_down(self.counter(slot.key_id, old), EXPIRY)
                    except Exception:           # counted twice until it expires: only ever refuses more
                        log.exception("could not move a parallel slot of key %s", slot.key_id)
        return moved

    def in_flight(self) -> int:
        """Slots held by this process now."""
        with self._lock:
            return len(self._live)

    def _ensure_renewer(self) -> None:
        """Start this process's renewal thread on its first slot (workers are forked after the app is made)."""
        if self._renewer_pid == os.getpid():
            return
        with self._lock:
            if self._renewer_pid == os.getpid():
                return
            self._renewer_pid = os.getpid()
        threading.Thread(target=self._run, name="boundless-parallel-slots", daemon=True).start()

    def close(self) -> None:
        """Stop renewing (the slots still held then free themselves within two epochs, as a dead process's)."""
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(RENEW_EVERY):
            try:
                self.renew()
            except Exception:
                log.exception("renewing parallel slots failed")
