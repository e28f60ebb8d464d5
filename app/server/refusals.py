"""
app.server.refusals
~~~~~~~~~~~~~~~~~~~

Count the requests refused after authentication (402, 429, a disabled key's 401, a 400/404/413 of a known key)
per key, UTC day, model and reason, for ``boundless usage``: one atomic upsert per refusal into the
``refusal`` table, no ledger row. Requests that reached a provider are in the ledger and not counted here.

The count is written when the refused request is reported (app/server/reporting.py, at teardown), so the
normal path never pays for it; a count that fails is logged by the reporter and never fails the request.
"""
from __future__ import annotations

import datetime

from flask import Flask
from peewee import MySQLDatabase

from ..store.models import Refusal
from ..store.models import db
from ..store.models import run_write
from . import reporting
from .reporting import Report

#: The reason recorded for each refused status (429 only when our own limits refused it: ``report.refused``).
REASONS = {400: "invalid_request", 401: "key_disabled", 402: "insufficient_quota", 404: "model_not_found",
           413: "request_too_large"}

#: The per-key policy's refusals, recorded under their error codes.
POLICY_REASONS = frozenset({"key_expired", "model_not_allowed", "budget_exceeded", "too_many_parallel_requests"})


def reason_of(report: Report) -> str | None:
    """Why a known key's request was refused, or None when it was not a refusal (or the key is unknown)."""
    if report.key_id is None or report.outcome is not None:      # no key, or it reached the provider
        return None
    if report.code in POLICY_REASONS:
        return report.code
    if report.status == 429:
        return "rate_limited" if report.refused in ("minute", "day") else None
    return REASONS.get(report.status)


def count(key_id: int, model: str, reason: str, day: datetime.date | None = None) -> None:
    """Add one refusal to (key, day, model, reason): one INSERT ... ON CONFLICT / ON DUPLICATE KEY UPDATE."""
    day = day or datetime.datetime.now(datetime.timezone.utc).date()
    query = Refusal.insert(key=key_id, day=day, model=model[:200], reason=reason, count=1)
    if isinstance(db.obj, MySQLDatabase):            # MySQL names no conflict target: the unique index is it
        query = query.on_conflict(update={Refusal.count: Refusal.count + 1})
    else:
        query = query.on_conflict(conflict_target=[Refusal.key, Refusal.day, Refusal.model, Refusal.reason],
                                  update={Refusal.count: Refusal.count + 1})
    sql, params = query.sql()
    # SQLite: with the request path's other writes (group commit), never SQLite's blocking busy wait.
    run_write(lambda execute: execute(sql, params), own_connection=True)


def _count_report(report: Report) -> None:
    reason = reason_of(report)
    if reason is not None:
        count(report.key_id, report.model or "", reason)


def init_app(app: Flask) -> None:
    """Count every refused request of ``app`` (a reporter: its failures are logged, never the caller's)."""
    reporting.subscribe(app, _count_report)
