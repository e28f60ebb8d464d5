"""
app.accounting.budget
~~~~~~~~~~~~~~~~~~~~~

A key's spending budget: at most ``budget`` micro-credits per calendar day, week (ISO, from Monday) or month in
``[limits] day_timezone``, on top of the prepaid balance. No Flask here.

The period's spending is two columns of the key's row, ``budget_spent`` and ``budget_period_start`` (the UTC
instant its period began), kept by the same statements that move the balance (app/accounting/ledger_sql.py):

* the reservation adds the worst case to ``budget_spent`` in the one conditional ``UPDATE`` that takes it from
  the balance, and only if the period's spending stays within the budget; when a new period has begun it
  starts the count afresh (``budget_spent = worst``, ``budget_period_start = `` the new start);
* the settlement adds ``charge - reserved`` in the transaction that gives the rest back, and the recovery of a
  dead worker's rows subtracts their reservation: each only for a ledger row made in the counted period
  (``created_at >= budget_period_start``), so a request that straddles midnight never touches the next period.

So ``budget_spent`` is always exactly the charges of the settled rows plus the reservations of the held rows made
since ``budget_period_start``; :func:`recount` computes that from the ledger when an operator sets or changes
a budget, so a cap set mid-month counts what the month has spent already.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

from peewee import fn

from .credits import amount
from .credits import to_micro
from ..errors import ConfigurationError
from ..store.models import ApiKey
from ..store.models import Usage

#: The periods a budget can have.
PERIODS = ("day", "week", "month")

UTC = datetime.timezone.utc


@dataclass(frozen=True)
class Periods:
    """The UTC starts (naive, as stored) of the current day, week and month in the budget's time zone."""

    day: datetime.datetime
    week: datetime.datetime
    month: datetime.datetime

    def of(self, kind: str) -> datetime.datetime:
        return getattr(self, kind)


def _local_starts(now: datetime.datetime, tz: datetime.tzinfo) -> dict[str, datetime.date]:
    today = now.astimezone(tz).date()
    return {"day": today, "week": today - datetime.timedelta(days=today.weekday()), "month": today.replace(day=1)}


def _midnight(day: datetime.date, tz: datetime.tzinfo) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(), tzinfo=tz)


def _naive_utc(moment: datetime.datetime) -> datetime.datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


#: The periods last worked out and the local day they hold for: (zone, day start, next day start, Periods), the
#: bounds naive UTC. Every paid request's reservation asks (for any key, budget or not), and the answer only
#: changes at a local midnight: the zone's rules run once a day, not per request (as RateLimiter._day does).
_kept: tuple | None = None


def periods(now: datetime.datetime, tz: datetime.tzinfo) -> Periods:
    """The periods holding ``now`` (aware)."""
    global _kept
    at = _naive_utc(now)
    kept = _kept
    if kept is not None and kept[0] is tz and kept[1] <= at < kept[2]:
        return kept[3]
    starts = _local_starts(now, tz)
    found = Periods(*(_naive_utc(_midnight(starts[k], tz)) for k in PERIODS))
    _kept = (tz, found.day, _naive_utc(_midnight(starts["day"] + datetime.timedelta(days=1), tz)), found)
    return found


def period_end(kind: str, now: datetime.datetime, tz: datetime.tzinfo) -> datetime.datetime:
    """When the ``kind`` period holding ``now`` (aware) ends: the next local midnight, Monday or first of a
    month, aware in ``tz``."""
    start = _local_starts(now, tz)[kind]
    if kind == "day":
        end = start + datetime.timedelta(days=1)
    elif kind == "week":
        end = start + datetime.timedelta(days=7)
    else:
        end = (start.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    return _midnight(end, tz)


def spent_now(row: ApiKey, now_periods: Periods) -> int:
    """The key's spending (charged + held) in its current period: 0 once a new period has begun."""
    if row.budget is None or row.budget_period_start is None:
        return 0
    return row.budget_spent if row.budget_period_start == now_periods.of(row.budget_period) else 0


def summary(row: ApiKey, now: datetime.datetime, tz: datetime.tzinfo) -> dict:
    """The budget fields of ``GET /api/v1/key`` (all null without a budget)."""
    if row.budget is None:
        return {"budget": None, "budget_period": None, "budget_spent": None, "budget_resets_at": None}
    end = period_end(row.budget_period, now, tz)
    return {"budget": amount(row.budget), "budget_period": row.budget_period,
            "budget_spent": amount(spent_now(row, periods(now, tz))),
            "budget_resets_at": end.isoformat()}


def parse_budget(text: str, allow_none: bool = False) -> int | None:
    """Read ``--budget``: credits (a decimal, at least 0), or ``none`` (on update: no budget). Micro-credits.

    :raise ConfigurationError: for a negative amount or a non-number.
    """
    if allow_none and text.strip().lower() == "none":
        return None
    try:
        micro = to_micro(text.strip())
    except ConfigurationError as err:
        raise ConfigurationError(f"--budget must be an amount of credits{' or none' if allow_none else ''}: "
                                 f"{err}") from None
    if micro < 0:
        raise ConfigurationError("--budget must not be negative")
    return micro


def parse_period(text: str) -> str:
    word = text.strip().lower()
    if word not in PERIODS:
        raise ConfigurationError(f"--budget-period must be day, week or month, not {text!r}")
    return word


def recount(key_id: int, kind: str, now: datetime.datetime, tz: datetime.tzinfo) -> tuple[int, datetime.datetime]:
    """(spending, UTC start) of the key's current ``kind`` period, from the ledger: settled charges plus held
    reservations of the rows made since the period began.

    Call it in the transaction that writes the budget, after locking the key's row: reservations and
    settlements lock that row first, so none of them can slip between this count and its write.
    """
    start = periods(now, tz).of(kind)
    charged = (Usage.select(fn.COALESCE(fn.SUM(Usage.charge), 0))
               .where((Usage.key == key_id) & (Usage.state == "settled") & (Usage.created_at >= start)).scalar())
    held = (Usage.select(fn.COALESCE(fn.SUM(Usage.reserved), 0))
            .where((Usage.key == key_id) & (Usage.state == "held") & (Usage.created_at >= start)).scalar())
    return int(charged) + int(held), start


__all__ = ["PERIODS", "Periods", "parse_budget", "parse_period", "period_end", "periods", "recount", "spent_now",
           "summary"]
