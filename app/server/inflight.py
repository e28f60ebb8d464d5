"""
app.server.inflight
~~~~~~~~~~~~~~~~~~~

A request's parallel slot (``keys ... --max-parallel``, app/limits/parallel.py), held from admission until the
response has ended in any way, and given back exactly once.

The one place every response ends is its WSGI ``close()``: gunicorn calls it after the last byte of a JSON answer,
after a stream's last event, when the caller hangs up, and when the relay fails; Werkzeug then calls the
response's ``call_on_close`` functions (after the stream generator's own ``finally`` has settled it). A request
that never gets that far (an exception no handler turned into a response) gives its slot back at teardown. A
worker killed with -9 runs neither: its slots free themselves (see app/limits/parallel.py).
"""
from __future__ import annotations

from functools import partial

from flask import Flask
from flask import Response
from flask import g

from ..state import state


def occupy(key) -> None:
    """Take one of the key's parallel slots for this request, if it has a cap.

    :raise TooManyParallel: 429 ``too_many_parallel_requests``: the key has its ``max_parallel`` in flight.
    """
    if key.max_parallel is not None:
        slots = state().parallel
        g._boundless_slot = (slots, slots.acquire(key.id, key.max_parallel))


def init_app(app: Flask) -> None:
    """Give every slot back when its response is closed (or, without a response, when the request ends)."""

    @app.after_request
    def _release_on_close(resp: Response) -> Response:
        held = g.get("_boundless_slot")
        if held is not None:                  # may run twice (a later hook failed): release() is idempotent
            resp.call_on_close(partial(held[0].release, held[1]))
            g._boundless_slot_handed = True
        return resp

    @app.teardown_request
    def _release_unanswered(exc) -> None:
        held = g.get("_boundless_slot")
        if held is not None and not g.get("_boundless_slot_handed"):
            held[0].release(held[1])
