"""
app.upstream.guard
~~~~~~~~~~~~~~~~~~

The safety net around :func:`app.upstream.proxy.forward`, for the gateway's own bugs.

Every failure the gateway expects is a :class:`GatewayError`, and ``proxy`` settles the lease before raising
it. Anything else raised after the reservation is a bug; without this net it would answer Flask's generic 500
and leave the credit held until the worker restarts. Here such an exception is logged with its traceback, the
request is settled at no cost (``outcome = gateway_error``, the whole reservation goes back) and reported
once, and the caller gets an OpenAI-shaped ``500 internal_error``. After a stream's first byte the caller
gets one SSE error event instead of a cut connection; the relay's own ``finally`` has settled that stream by
then, as it settles a cut (what was delivered), and the net settles it at no cost only if that failed too.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable
from typing import Iterator

from ..accounting import billing
from ..accounting.billing import Lease
from ..accounting.billing import Outcome
from ..errors import GatewayError
from ..errors import InternalError
from ..errors import sse_error_event

log = logging.getLogger("boundless")

_MESSAGE = "The gateway had an error while processing your request; nothing was charged. Retry it."


@contextmanager
def settled_on_crash(lease: Lease, started: float, finish: Callable[[Lease, Outcome], None]) -> Iterator[None]:
    """Run the block; on an exception that is not a :class:`GatewayError`, settle at no cost and report.

    :raise InternalError: in place of that exception (500, chained to it).
    """
    try:
        yield
    except GatewayError:
        raise
    except Exception as err:
        log.exception("request %s failed inside the gateway; settling it at no cost", lease.request_id)
        _settle_at_no_cost(lease, started, finish)
        raise InternalError(_MESSAGE) from err


def stream_net(chunks: Iterator[bytes], lease: Lease,
               render: Callable[[GatewayError], bytes] = sse_error_event) -> Iterator[bytes]:
    """Relay ``chunks``; if they fail with an exception that is not a :class:`GatewayError`, log it, make sure
    the lease is settled, and end the stream with one SSE error event (``render``: the stream's API's shape)
    instead of a cut connection."""
    try:
        yield from chunks
    except Exception:                # GeneratorExit (the caller hung up) is not an Exception: it passes
        log.exception("stream %s failed inside the gateway", lease.request_id)
        if not lease.settled:        # the relay's finally settles; this only covers a failure of that too
            _settle_at_no_cost(lease, None, None)
        yield render(InternalError(_MESSAGE))


def _settle_at_no_cost(lease: Lease, started: float | None, finish) -> None:
    outcome = Outcome(outcome="gateway_error")            # nothing produced, no usage: charge 0
    if started is not None:
        outcome.latency_ms = (time.perf_counter() - started) * 1000
    try:
        billing.settle_or_defer(lease, outcome)            # a lease settled already stays as it is
    except Exception:
        log.exception("settling %s after a gateway error failed", lease.request_id)
    if finish is not None:
        try:
            finish(lease, outcome)
        except Exception:
            log.exception("reporting %s failed", lease.request_id)
