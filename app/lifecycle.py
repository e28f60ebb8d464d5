"""
app.lifecycle
~~~~~~~~~~~~~

What happens around the workers' lives, called from the hooks in gunicorn.conf.py.

* :func:`install_graceful_stop` (in each worker): on SIGTERM, gunicorn stops accepting and lets requests
  finish for ``graceful_timeout`` seconds, then kills the worker. Just before that deadline we cut the
  upstreams of the streams still open, so every one of them ends through its own ``finally``: one SSE error
  event to the caller, settlement, a log line. Nothing is left held.
* :func:`settle_dead` (``boundless db recover``, which the master runs in a child process when a worker
  exits and at start, so the master itself never imports the app or holds a database socket): a worker killed
  with -9 never ran its ``finally``; its held ledger rows are settled (charge 0, reservation returned; see
  ``billing.settle_lost``).
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from . import billing
from .models import Usage

log = logging.getLogger("boundless")

#: Seconds before gunicorn's graceful deadline at which open streams are cut.
CUT_MARGIN = 1.5


def install_graceful_stop(worker) -> None:
    """Chain onto the worker's SIGTERM handler: cut open streams just before the graceful deadline."""
    state = worker.wsgi.extensions["boundless"]
    previous = signal.getsignal(signal.SIGTERM)
    delay = max(0.0, worker.cfg.graceful_timeout - CUT_MARGIN)

    def on_term(signum, frame):
        if callable(previous):
            previous(signum, frame)
        timer = threading.Timer(delay, state.streams.cut_all)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_term)


def settle_dead(host: str, pid: int | None = None) -> int:
    """Settle the held rows of worker ``pid`` on ``host``, or of every dead worker of ``host``."""
    if pid is not None:
        owners = [f"{host}:{pid}"]
    else:
        owners = [o for (o,) in Usage.select(Usage.owner).where(
            (Usage.state == "held") & Usage.owner.startswith(host + ":")).distinct().tuples()
            if not _alive(int(o.rsplit(":", 1)[1]))]
    n = billing.settle_lost(owners) if owners else 0
    if n:
        log.warning("settled %d request(s) left in flight by dead worker(s) %s at no charge", n, owners)
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
