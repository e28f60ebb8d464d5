"""
app.accounting.reports
~~~~~~~~~~~~~~~~~~~~~~

Reading the ledger for people: the usage report (``boundless usage``, ``GET /api/v1/usage``, the console's
usage page) and pages of ledger rows (``GET /api/v1/ledger``, the console's ledger and key pages). One query
each, shared by the CLI, the admin API and the console, so that they always agree. No Flask here.

Times are UTC, as the ledger stores them. Dates given as ``YYYY-MM-DD`` cover whole days: ``until`` a date
includes that day.
"""
from __future__ import annotations

import csv
import datetime
import io
from dataclasses import dataclass
from dataclasses import field

from peewee import Case
from peewee import fn

from .credits import amount
from ..store.models import ApiKey
from ..store.models import Refusal
from ..store.models import Usage
from ..store.models import UsageDay

#: The groupings of the usage report.
GROUPS = ("day", "model", "key")


def parse_moment(value: str | None, end: bool = False) -> datetime.datetime | None:
    """A ``YYYY-MM-DD`` date (its midnight; with ``end``, the next midnight) or an ISO date-time, as naive
    UTC.

    :raise ValueError: for anything else, with a message naming the expected forms.
    """
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            day = datetime.date.fromisoformat(value)
            return datetime.datetime.combine(day + datetime.timedelta(days=1 if end else 0), datetime.time())
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD) or an ISO date-time") from None
    if moment.tzinfo is not None:          # the ledger is in UTC: convert, do not just drop the offset
        moment = moment.astimezone(datetime.timezone.utc)
    return moment.replace(tzinfo=None)


@dataclass
class UsageRow:
    """One group of the usage report; ``charge`` in micro-credits."""

    group: str | None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    charge: int = 0
    estimated: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def as_json(self, by: str) -> dict:
        return {by: self.group, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "credits": amount(self.charge),
                "estimated": self.estimated, "refused": self.refused}


def usage(by: str = "day", key_name: str | None = None, model: str | None = None,
          since: datetime.datetime | None = None, until: datetime.datetime | None = None) -> list[UsageRow]:
    """Requests, tokens, credits and refusals of settled ledger rows, grouped ``by`` day (UTC), model or key,
    in group order; ``until`` is exclusive (see :func:`parse_moment`)."""
    if by not in GROUPS:
        raise ValueError(f"by must be one of {', '.join(GROUPS)}")
    ledger = _ledger_groups(by, key_name, model, since, until)
    refused = _refusals(by, key_name, model, since, until)
    groups = sorted(set(ledger) | set(refused), key=lambda g: (g == "", g))
    out = []
    for g in groups:
        row = ledger.get(g) or UsageRow(g)
        row.group = g or None
        row.refused = refused.get(g, {})
        out.append(row)
    return out


def _ledger_groups(by, key_name, model, since, until) -> dict[str, UsageRow]:
    """The settled ledger's sums per group: whole UTC days from the daily roll-up (``usage_day``, kept in the
    settlement's transaction), the partial days at either end of a since/until with a time of day from the
    ledger rows themselves. Same numbers as summing the ledger, at a few thousand roll-up rows instead of up to
    millions of ledger rows (docs/benchmarks.md, "The ledger at scale")."""
    first = _day_after(since)                      # roll-up days are [first, end); None: open
    end = until.date() if until is not None else None
    out: dict[str, UsageRow] = {}
    if first is not None and end is not None and first >= end:      # within one day, or less
        _add(out, _ledger_sums(by, key_name, model, since, until))
        return out
    _add(out, _roll_up_sums(by, key_name, model, first, end))
    if since is not None and first is not None and since < _midnight(first):
        _add(out, _ledger_sums(by, key_name, model, since, _midnight(first)))
    if until is not None and until > _midnight(end):
        _add(out, _ledger_sums(by, key_name, model, _midnight(end), until))
    return out


def model_known(model: str, catalog_models) -> bool:
    """Whether ``model`` is a catalogue id (in ``catalog_models``) or one the ledger or the refusal counts name
    (a model removed from the catalogue still has its history)."""
    return bool(model in catalog_models or Usage.select().where(Usage.model == model).exists()
                or Refusal.select().where(Refusal.model == model).exists())


def _day_after(moment: datetime.datetime | None) -> datetime.date | None:
    """The first whole day from ``moment`` on: its own day at midnight, else the next one."""
    if moment is None:
        return None
    return moment.date() if moment.time() == datetime.time() else moment.date() + datetime.timedelta(days=1)


def _midnight(day: datetime.date) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time())


def _add(out: dict[str, UsageRow], rows: dict[str, UsageRow]) -> None:
    for g, r in rows.items():
        total = out.setdefault(g, UsageRow(g))
        total.requests += r.requests
        total.prompt_tokens += r.prompt_tokens
        total.completion_tokens += r.completion_tokens
        total.charge += r.charge
        total.estimated += r.estimated


def _roll_up_sums(by, key_name, model, first: datetime.date | None, end: datetime.date | None) -> dict[str, UsageRow]:
    group = {"day": UsageDay.day, "model": UsageDay.model, "key": ApiKey.name}[by]
    query = (UsageDay.select(group.alias("grp"), fn.SUM(UsageDay.requests), fn.SUM(UsageDay.prompt_tokens),
                             fn.SUM(UsageDay.completion_tokens), fn.SUM(UsageDay.charge), fn.SUM(UsageDay.estimated))
             .join(ApiKey))
    if key_name:
        query = query.where(ApiKey.name == key_name)
    if model:
        query = query.where(UsageDay.model == model)
    if first is not None:
        query = query.where(UsageDay.day >= first)
    if end is not None:
        query = query.where(UsageDay.day < end)
    return {str(g): UsageRow(str(g), int(n or 0), int(p or 0), int(c or 0), int(ch or 0), int(e or 0))
            for g, n, p, c, ch, e in query.group_by(group).tuples()}


def _ledger_sums(by, key_name, model, since, until) -> dict[str, UsageRow]:
    # DATE() uncoerced: peewee would read SQLite's 'YYYY-MM-DD' back through DateTimeField as a midnight datetime
    group = {"day": fn.DATE(Usage.created_at).coerce(False), "model": Usage.model, "key": ApiKey.name}[by]
    query = (Usage.select(group.alias("grp"), fn.COUNT(Usage.id), fn.SUM(Usage.prompt_tokens),
                          fn.SUM(Usage.completion_tokens), fn.SUM(Usage.charge),
                          fn.SUM(Case(None, [(Usage.estimated == True, 1)], 0)))   # noqa: E712
             .join(ApiKey)
             .where(Usage.state == "settled"))
    if key_name:
        query = query.where(ApiKey.name == key_name)
    if model:
        query = query.where(Usage.model == model)
    if since:
        query = query.where(Usage.created_at >= since)
    if until:
        query = query.where(Usage.created_at < until)
    return {str(g): UsageRow(str(g), int(n), int(p or 0), int(c or 0), int(ch or 0), int(e or 0))
            for g, n, p, c, ch, e in query.group_by(group).tuples()}


def _refusals(by: str, key_name: str | None, model: str | None, since: datetime.datetime | None,
              until: datetime.datetime | None) -> dict[str, dict[str, int]]:
    """{group: {reason: count}} of the refused requests; counted per UTC day, so a since or until with a
    time of day takes in the whole day it falls in."""
    group = {"day": Refusal.day, "model": Refusal.model, "key": ApiKey.name}[by]
    query = (Refusal.select(group.alias("grp"), Refusal.reason, fn.SUM(Refusal.count))
             .join(ApiKey))
    if key_name:
        query = query.where(ApiKey.name == key_name)
    if model:
        query = query.where(Refusal.model == model)
    if since:
        query = query.where(Refusal.day >= since.date())
    if until:
        query = query.where(Refusal.day < _day_after(until))
    out: dict[str, dict[str, int]] = {}
    for grp, reason, n in query.group_by(group, Refusal.reason).tuples():
        out.setdefault(str(grp) if grp is not None else "", {})[reason] = int(n)
    return out


def failures(since: datetime.datetime | None = None) -> dict[str, int]:
    """{outcome: requests} of the settled requests that did not complete (upstream errors, cuts, hang-ups)."""
    query = (Usage.select(Usage.outcome, fn.COUNT(Usage.id))
             # two ranges, not !=: each is a range of the (outcome, created_at) index (v7)
             .where((Usage.state == "settled") & ((Usage.outcome < "complete") | (Usage.outcome > "complete"))))
    if since:
        query = query.where(Usage.created_at >= since)
    return {outcome or "unknown": int(n) for outcome, n in query.group_by(Usage.outcome).tuples()}


# --------------------------------------------------------------------------------------------------
# Ledger rows
# --------------------------------------------------------------------------------------------------

#: Columns of a ledger row as the API, its CSV and the console show them, in this order.
LEDGER_COLUMNS = ("request_id", "created_at", "key", "model", "state", "stream", "status", "outcome",
                  "prompt_tokens", "completion_tokens", "reserved", "charge", "estimated", "latency_ms", "ttfb_ms")


def ledger(key_name: str | None = None, model: str | None = None, status: str | None = None,
           since: datetime.datetime | None = None, until: datetime.datetime | None = None,
           request_id: str | None = None, limit: int = 50, cursor: int | None = None,
           key_id: int | None = None) -> tuple[list[dict], int | None]:
    """Ledger rows, newest first, and the cursor of the next page (None on the last page).

    ``status`` is an upstream HTTP status (``502``), a state (``held``, ``settled``) or an outcome
    (``complete``, ``upstream_error``, ``client_closed`` ...). The cursor is the id of the last row shown:
    rows written meanwhile never shift a page, as an offset would.
    """
    query = (Usage.select(Usage, ApiKey.name.alias("key_name"))
             .join(ApiKey)
             .order_by(Usage.id.desc()))
    if key_id is not None:
        query = query.where(Usage.key == key_id)
    if key_name:
        query = query.where(ApiKey.name == key_name)
    if model:
        query = query.where(Usage.model == model)
    if status:
        if status.isdigit():
            query = query.where(Usage.status == int(status))
        elif status in ("held", "settled"):
            query = query.where(Usage.state == status)
        else:
            query = query.where(Usage.outcome == status)
    if since:
        query = query.where(Usage.created_at >= since)
    if until:
        query = query.where(Usage.created_at < until)
    if request_id:
        query = query.where(Usage.request_id == request_id)
    if cursor is not None:
        query = query.where(Usage.id < cursor)
    rows = list(query.limit(limit + 1).objects())
    more = len(rows) > limit
    rows = rows[:limit]
    return [ledger_row(r) for r in rows], (rows[-1].id if more and rows else None)


def ledger_row(row: Usage) -> dict:
    return {"request_id": row.request_id, "created_at": row.created_at.isoformat(timespec="seconds") + "Z",
            "key": getattr(row, "key_name", None), "model": row.model, "state": row.state, "stream": bool(row.stream),
            "status": row.status, "outcome": row.outcome, "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens, "reserved": amount(row.reserved),
            "charge": amount(row.charge), "estimated": bool(row.estimated),
            "latency_ms": None if row.latency_ms is None else round(row.latency_ms, 1),
            "ttfb_ms": None if row.ttfb_ms is None else round(row.ttfb_ms, 1)}


def ledger_csv(rows: list[dict]) -> str:
    """Ledger rows as CSV, with a header row (shared with the console's download)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEDGER_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row[k]) for k in LEDGER_COLUMNS})
    return out.getvalue()


USAGE_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "credits", "estimated", "refused")


def usage_csv(rows: list[UsageRow], by: str) -> str:
    """The usage report as CSV, one row per group (``by``), with a header row; ``refused`` is the group's
    refusals of every reason together (the console's download)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((by, *USAGE_COLUMNS))
    for r in rows:
        writer.writerow((_csv_cell(str(r.group or "")), r.requests, r.prompt_tokens, r.completion_tokens,
                         amount(r.charge), r.estimated, sum(r.refused.values())))
    return out.getvalue()


def _csv_cell(value):
    # A cell starting with = + - @ is a formula to a spreadsheet: a model name or key name is the caller's text.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


__all__ = ["GROUPS", "LEDGER_COLUMNS", "UsageRow", "failures", "ledger", "ledger_csv", "ledger_row", "parse_moment", "usage",
           "usage_csv"]
