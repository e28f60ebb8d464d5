"""
app.server.lifecycle
~~~~~~~~~~~~~~~~~~~~

What happens around the workers' lives, called from the hooks in gunicorn.conf.py.

* :func:`install_graceful_stop` (in each worker): on SIGTERM, gunicorn stops accepting and lets requests
  finish for ``graceful_timeout`` seconds, then kills the worker. Just before that deadline we cut the
  upstreams of the streams still open, so every one of them ends through its own ``finally``: one SSE error
  event to the caller, settlement, a log line. Nothing is left held.
* A worker killed with -9 (or a box that died) never ran its ``finally``. Every held ledger row names its
  worker (``<instance>:<pid>``) and every worker beats (:func:`start_heartbeat`, every 10 s). The master runs
  ``boundless db recover --owner`` in a child process when a worker exits (so the master never imports the
  app nor holds a database socket), and every live worker now and then settles the rows of workers, of any
  gateway sharing the database, silent for 90 s (:func:`settle_silent`). Such rows are charged nothing and
  their reservation is returned (``billing.settle_lost``).
"""
from __future__ import annotations

import datetime
import gc
import logging
import signal
import threading
import time

from peewee import JOIN

from ..accounting import billing
from ..store.models import Heartbeat
from ..store.models import Usage
from ..store.models import db
from ..store.models import utcnow

log = logging.getLogger("boundless")

#: Seconds before gunicorn's graceful deadline at which open streams are cut.
CUT_MARGIN = 1.5
#: A worker beats this often...
BEAT_EVERY = 10.0
#: ...is taken for dead after this long without a beat...
SILENT_AFTER = 90.0
#: ...and each worker looks for silent ones every this many beats.
SWEEP_EVERY = 6


def install_graceful_stop(worker) -> None:
    """Chain onto the worker's SIGTERM handler: cut open streams just before the graceful deadline."""
    state = worker.wsgi.extensions["boundless"]
    previous = signal.getsignal(signal.SIGTERM)
    delay = max(0.0, worker.cfg.graceful_timeout - CUT_MARGIN)
    stopping = threading.Event()

    def cut_at_deadline() -> None:
        stopping.wait()
        time.sleep(delay)
        state.streams.cut_all()

    # Started now, not in the handler: under gevent a signal handler runs in the event loop, where
    # starting a thread (which waits for it to start) is a blocking call and fails; setting an event is not.
    threading.Thread(target=cut_at_deadline, name="boundless-graceful-stop", daemon=True).start()

    def on_term(signum, frame):
        if callable(previous):
            previous(signum, frame)
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)


def settle_owner(owner: str) -> int:
    """Settle the held rows of one worker that is known to be dead (the master saw it exit)."""
    n = billing.settle_lost([owner])
    if n:
        log.warning("worker %s died with %d request(s) in flight; settled them at no charge", owner, n)
    return n


def settle_silent(silent: float = SILENT_AFTER) -> int:
    """Settle the held rows of every worker, of any gateway, that has not beaten for ``silent`` seconds."""
    cutoff = utcnow() - datetime.timedelta(seconds=silent)
    owners = [o for (o,) in (Usage.select(Usage.owner).distinct()
                             .join(Heartbeat, JOIN.LEFT_OUTER, on=(Heartbeat.owner == Usage.owner))
                             .where((Usage.state == "held") & (Usage.created_at < cutoff)
                                    & (Heartbeat.seen_at.is_null() | (Heartbeat.seen_at < cutoff)))
                             .tuples())]
    n = billing.settle_lost(owners) if owners else 0
    if n:
        log.warning("settled %d request(s) left in flight by silent worker(s) %s at no charge", n, owners)
    return n


def beat(owner: str) -> None:
    now = utcnow()
    if not Heartbeat.update(seen_at=now).where(Heartbeat.owner == owner).execute():
        Heartbeat.insert(owner=owner, seen_at=now).on_conflict_ignore().execute()


def start_heartbeat(interval: float = BEAT_EVERY) -> threading.Thread:
    """Beat every ``interval`` seconds from this worker, and now and then settle silent workers' rows."""

    def run() -> None:
        n = 0
        while True:
            try:
                with db.connection_context():
                    beat(billing.OWNER.get())
                    billing.retry_pending()
                    if n % SWEEP_EVERY == 0:
                        settle_silent()
                        (Heartbeat.delete()
                         .where(Heartbeat.seen_at < utcnow() - datetime.timedelta(days=1))
                         .execute())
            except Exception:      # the database may be down for a while; beat again later
                log.exception("heartbeat failed")
            n += 1
            time.sleep(interval)

    thread = threading.Thread(target=run, name="boundless-heartbeat", daemon=True)
    thread.start()
    return thread


def freeze_startup_objects() -> None:
    """Move everything loaded so far (Flask, gevent, peewee, the catalogue ...) out of the collector's sight.

    A full collection otherwise walks all of those objects again and again, a pause of milliseconds in the
    middle of some request; they live as long as the worker anyway. (``gc.freeze``, as the CPython docs
    advise for pre-fork servers; requests' own short-lived objects are collected as before.)
    """
    gc.collect()
    gc.freeze()
