"""
app.server.reporting
~~~~~~~~~~~~~~~~~~~~

Exactly one :class:`Report` per request, handed to the subscribers (the access log and the metrics).

Who reports a request:

* A chat request that reached the upstream stage (the view set ``g.boundless_lease``) is reported by the
  finish hook, which knows the upstream's outcome, the usage and the charge.

  - If the hook runs inside the view (every non-stream request, and a stream that failed before its first
    byte), the caller's status is not known yet (an upstream 503 becomes our 502), so the report is kept on
    ``g`` and completed when the request ends.
  - A stream that started is reported from its generator's ``finally``, with no request context, and with
    status 200: that is what the caller got.

* Every other request (refused with 400/401/402/404/429/503, health checks, /metrics, unknown routes) is
  reported when its request ends, with what is known.

"When the request ends" is ``teardown_request``, which runs once even when an ``after_request`` handler
fails; ``after_request`` only notes the final status. A report or a subscriber that fails is logged and
never reaches the caller.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from flask import Flask
from flask import Response
from flask import g
from flask import has_request_context
from flask import request

from ..accounting import billing
from ..accounting.billing import Lease
from ..accounting.billing import Outcome

log = logging.getLogger("boundless")

_EXT = "boundless_reporters"


@dataclass
class Report:
    """What one request was and what it cost. ``outcome`` is None for requests that never reached upstream."""

    ts: float                              # time.time() when the request ended
    method: str
    path: str
    route: str                             # the URL rule ("unmatched" for unknown paths), never the raw path
    status: int                            # what the caller got
    request_id: str | None = None
    remote_addr: str | None = None
    key_name: str | None = None
    key_prefix: str | None = None
    key_id: int | None = None              # the authenticated (or disabled) key, for the refusal counts
    model: str | None = None               # a catalogue id, or None
    provider: str | None = None
    stream: bool | None = None
    upstream_status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    charge: int | None = None              # micro-credits
    estimated: bool | None = None
    latency_ms: float | None = None
    ttfb_ms: float | None = None
    outcome: str | None = None
    refused: str | None = None             # "minute" | "day" (429 of our limits) | "credit" (402)
    code: str | None = None                # the error's code, for a request refused before the upstream
    answered_model: str | None = None      # the model that answered (the one asked for, or a fallback)
    attempts: list[dict] | None = None     # every upstream call the request took (app/upstream/routing.py)


Subscriber = Callable[[Report], None]


def subscribe(app: Flask, fn: Subscriber) -> None:
    """Call ``fn(report)`` once per request of ``app`` (installs the hooks on first use)."""
    subs = app.extensions.get(_EXT)
    if subs is None:
        subs = app.extensions[_EXT] = []
        _install(app, subs)
    subs.append(fn)


def _install(app: Flask, subs: list[Subscriber]) -> None:
    def emit(report: Report) -> None:
        for fn in subs:
            try:
                fn(report)
            except Exception:               # a log or metric must never break a request
                log.exception("request reporter %r failed", fn)

    @app.before_request
    def _started() -> None:
        g._boundless_t0 = time.perf_counter()

    @app.after_request
    def _status(resp: Response) -> Response:
        g._boundless_status = resp.status_code       # may run twice (an after_request failed): the last wins
        lease = g.get("boundless_lease")
        if lease is not None:
            lease.context.setdefault("route", _route())
        return resp

    @app.teardown_request
    def _ended(exc: BaseException | None) -> None:
        if g.get("_boundless_reported"):
            return
        g._boundless_reported = True
        try:
            status = g.get("_boundless_status", 500)
            lease = g.get("boundless_lease")
            finished = g.get("_boundless_finished")
            if finished is not None:
                emit(from_finish(*finished, status))
            elif lease is not None and lease.stream and status == 200:
                return                      # a stream on its way: its generator's finally reports it
            else:
                emit(from_request(status))
        except Exception:
            log.exception("could not report request")

    def finish_hook(lease: Lease, outcome: Outcome) -> None:
        try:
            if has_request_context() and g.get("boundless_lease") is lease and not g.get("_boundless_reported"):
                g._boundless_finished = (lease, outcome)       # reported at teardown, with the final status
                return
            emit(from_finish(lease, outcome, 200))
        except Exception:
            log.exception("could not report request")

    app.extensions["boundless"].finish_hooks.append(finish_hook)


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


def _elapsed_ms() -> float | None:
    t0 = g.get("_boundless_t0")
    return None if t0 is None else round((time.perf_counter() - t0) * 1000, 1)


def from_request(status: int) -> Report:
    """A request that never reached the upstream stage (or failed before its finish hook ran)."""
    key = g.get("_boundless_key") or g.get("boundless_refused_key")    # the latter: a disabled key's 401
    model = g.get("boundless_model")
    refused = None
    if status == 429:
        decision = g.get("_boundless_rate")
        refused = getattr(decision, "refused", None)
    elif status == 402:
        refused = "credit"
    lease = g.get("boundless_lease")
    return Report(
        ts=time.time(), method=request.method, path=request.path, route=_route(), status=status,
        request_id=g.get("request_id"), remote_addr=request.remote_addr,
        key_name=getattr(key, "name", None), key_prefix=getattr(key, "prefix", None), key_id=getattr(key, "id", None),
        model=getattr(model, "id", None), provider=getattr(getattr(model, "provider", None), "name", None),
        stream=lease.stream if lease is not None else None,
        latency_ms=_elapsed_ms(), refused=refused, code=g.get("boundless_error_code"))


def from_finish(lease: Lease, outcome: Outcome, status: int) -> Report:
    """A chat request that reached the upstream stage, as its finish hook saw it."""
    ctx = lease.context
    # What the ledger got; if settling failed (it is retried later), what it will get.
    charge, pt, ct, estimated = outcome.settled or billing.charge_for(lease, outcome)
    return Report(
        ts=time.time(), method=ctx.get("method", "POST"), path=ctx.get("path", ""),
        route=ctx.get("route") or ctx.get("path", ""), status=status, request_id=lease.request_id,
        remote_addr=ctx.get("remote_addr"), key_name=ctx.get("key_name"), key_prefix=ctx.get("key_prefix"),
        model=lease.model.id, provider=outcome.provider or lease.model.provider.name, stream=lease.stream,
        upstream_status=outcome.status, prompt_tokens=pt, completion_tokens=ct, charge=charge,
        estimated=estimated, latency_ms=_round(outcome.latency_ms), ttfb_ms=_round(outcome.ttfb_ms),
        outcome=outcome.outcome, answered_model=outcome.model.id if outcome.model else None,
        attempts=outcome.attempts)


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 1)
