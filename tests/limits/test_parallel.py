"""Parallel slots (app/limits/parallel.py) on each rate-limit storage: the cap is exact under concurrency,
release frees once, live slots survive epochs, a dead process's slots free themselves within two epochs."""
from __future__ import annotations

import threading

import pytest

from app.errors import TooManyParallel
from app.limits import parallel
from app.limits.parallel import EPOCH
from app.limits.parallel import ParallelSlots
from app.limits.ratelimit import RateLimiter
from support import Memcached
from support import flush_redis


class Clock:
    def __init__(self) -> None:
        self.now = 1_000 * EPOCH + 1

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _stop_renewers(monkeypatch):
    """Each ParallelSlots of a test stops renewing at its end: a renewer left running would go on writing to a
    storage that the test has stopped, and log its failures into later tests."""
    made = []
    real_init = ParallelSlots.__init__

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        made.append(self)

    monkeypatch.setattr(ParallelSlots, "__init__", init)
    yield
    for slots in made:
        slots.close()


@pytest.fixture(params=["sqlite", "redis", "memcached"])
def limiter(request, tmp_path):
    if request.param == "sqlite":
        yield RateLimiter(f"sqlite:///{tmp_path / 'rl.db'}")
    elif request.param == "redis":
        yield RateLimiter(flush_redis(12))
    else:
        mc = Memcached()
        try:
            yield RateLimiter(mc.uri)
        finally:
            mc.stop()


def test_cap_release_and_renewal_across_epochs(limiter):
    clock = Clock()
    slots = ParallelSlots(limiter, clock)
    a, b = slots.acquire(1, 2), slots.acquire(1, 2)
    with pytest.raises(TooManyParallel) as refused:
        slots.acquire(1, 2)
    assert (refused.value.status, refused.value.code) == (429, "too_many_parallel_requests")
    assert "Retry-After" not in refused.value.headers
    other = slots.acquire(2, 1)                        # another key has its own slots
    slots.release(a)
    slots.release(a)                                   # a second release gives nothing more back
    c = slots.acquire(1, 2)
    with pytest.raises(TooManyParallel):
        slots.acquire(1, 2)
    # the holders live on through several epochs, moved by the renewal
    for _ in range(4):
        clock.now += EPOCH
        slots.renew()
        with pytest.raises(TooManyParallel):
            slots.acquire(1, 2)
    # and before a renewal has run in a new epoch, they are still counted (in the previous one)
    clock.now += EPOCH
    with pytest.raises(TooManyParallel):
        slots.acquire(1, 2)
    slots.release(b)                                   # released from the previous epoch's counter
    d = slots.acquire(1, 2)
    for s in (c, d, other):
        slots.release(s)
    assert slots.in_flight() == 0
    for _ in range(2):
        slots.release(slots.acquire(1, 2))
    held = [slots.acquire(1, 2), slots.acquire(1, 2)]
    assert slots.in_flight() == 2
    for s in held:
        slots.release(s)


def test_a_dead_process_frees_its_slots_within_two_epochs(limiter):
    clock = Clock()
    dead = ParallelSlots(limiter, clock)               # never renews nor releases again: killed with -9
    alive = ParallelSlots(limiter, clock)
    dead.acquire(7, 2)
    dead.acquire(7, 2)
    kept = alive.acquire(9, 1)
    clock.now += EPOCH - 2                             # the same epoch, and the next one: still counted
    with pytest.raises(TooManyParallel):
        alive.acquire(7, 2)
    clock.now += EPOCH
    alive.renew()
    with pytest.raises(TooManyParallel):
        alive.acquire(7, 2)
    with pytest.raises(TooManyParallel):
        alive.acquire(9, 1)                            # the live slot is still held after the move
    clock.now += EPOCH                                 # two epoch starts after the dead one's last mark
    alive.renew()
    got = [alive.acquire(7, 2), alive.acquire(7, 2)]
    with pytest.raises(TooManyParallel):
        alive.acquire(7, 2)
    with pytest.raises(TooManyParallel):
        alive.acquire(9, 1)
    for s in got + [kept]:
        alive.release(s)


def test_concurrent_acquires_admit_exactly_the_cap(limiter):
    slots = ParallelSlots(limiter)
    won, lost = [], []
    start = threading.Barrier(12)

    def one():
        start.wait()
        try:
            won.append(slots.acquire(3, 4))
        except TooManyParallel:
            lost.append(1)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(lost)) == (4, 8)
    for s in won:
        slots.release(s)
    assert len([slots.acquire(3, 4) for _ in range(4)]) == 4


def test_epochs_free_a_dead_workers_slots_within_a_minute():
    assert 2 * parallel.EPOCH + parallel.RENEW_EVERY <= 60
    assert parallel.EXPIRY > 2 * parallel.EPOCH + parallel.RENEW_EVERY
