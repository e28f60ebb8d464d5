"""A key's spending budget (app/accounting/budget.py) inside the balance's reservation (app/accounting/billing.py),
on SQLite, PostgreSQL and MariaDB: calendar periods in a time zone, the one conditional UPDATE, settlement,
dead workers' rows, and the count from the ledger when an operator sets a budget."""
from __future__ import annotations

import datetime
import json
import threading
import zoneinfo
from decimal import Decimal

import pytest

from app import keys
from app.accounting import billing
from app.accounting import budget
from app.accounting.credits import amount
from app.accounting.billing import Outcome
from app.catalog import Model
from app.catalog import Provider
from app.errors import BudgetExceeded
from app.errors import ConfigurationError
from app.errors import InsufficientCredits
from app.store import schema
from app.store.models import ApiKey
from app.store.models import Usage
from app.store.models import UsageDay
from app.store.models import db
from app.store.models import make_database
from support import PAID_IN
from support import PAID_OUT
from support import ledger_check

PROVIDER = Provider(name="mock", base_url="http://127.0.0.1:9/v1", api_key_env=None)
PAID = Model(id="paid-model", provider=PROVIDER, upstream_model="mock-paid", owned_by="mock",
             input_price=Decimal(PAID_IN), output_price=Decimal(PAID_OUT), max_output_tokens=100)
FREE = Model(id="free-model", provider=PROVIDER, upstream_model="mock-model", owned_by="mock")
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
UTC = datetime.timezone.utc
BODY = {"model": "paid-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
RAW = json.dumps(BODY).encode()
WORST = billing.prompt_upper_bound(BODY) * PAID_IN + 10 * PAID_OUT       # micro-credits per request


# --------------------------------------------------------------------------------------------------
# periods
# --------------------------------------------------------------------------------------------------

def test_periods_are_calendar_day_iso_week_and_month_in_the_zone():
    # Sunday 2026-03-01 23:30 UTC is Monday 00:30 in Paris: a new day, a new week, still March
    now = datetime.datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    p = budget.periods(now, PARIS)
    assert p.day == p.week == datetime.datetime(2026, 3, 1, 23, 0)       # Paris midnight, in UTC
    assert p.month == datetime.datetime(2026, 2, 28, 23, 0)
    assert budget.period_end("day", now, PARIS).isoformat() == "2026-03-03T00:00:00+01:00"
    assert budget.period_end("week", now, PARIS).isoformat() == "2026-03-09T00:00:00+01:00"
    assert budget.period_end("month", now, PARIS).isoformat() == "2026-04-01T00:00:00+02:00"   # after the DST change
    assert budget.period_end("month", datetime.datetime(2026, 12, 31, 12, tzinfo=UTC), UTC).isoformat() == (
        "2027-01-01T00:00:00+00:00")
    # in UTC the same instant is still Sunday: the week began on Monday 2026-02-23
    assert budget.periods(now, UTC).week == datetime.datetime(2026, 2, 23)


@pytest.mark.parametrize("text, micro", [("10", 10_000_000), ("0.5", 500_000), ("0", 0)])
def test_parse_budget(text, micro):
    assert budget.parse_budget(text) == micro


@pytest.mark.parametrize("text", ["-1", "ten", "", "none", "1.0000001"])
def test_parse_budget_refuses(text):
    with pytest.raises(ConfigurationError, match="--budget"):
        budget.parse_budget(text)
    assert budget.parse_budget("none", allow_none=True) is None


# --------------------------------------------------------------------------------------------------
# the reservation, on each database
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def on_db(database):
    db.initialize(make_database(database.url))
    with db.connection_context():
        schema.create()
    yield database.url
    db.close_all()


def _key(name: str, credit: str = "100", **policy) -> int:
    keys.create(name, credit=credit, **policy)
    return ApiKey.get(ApiKey.name == name).id


def _row(kid: int) -> ApiKey:
    return ApiKey.get_by_id(kid)


def _reserve(kid: int, tz=UTC, model=PAID):
    return billing.reserve(kid, model, BODY, RAW, False, billing.new_request_id(), tz=tz)


def _usage(completion: int) -> Outcome:
    return Outcome(status=200, usage={"prompt_tokens": 5, "completion_tokens": completion}, produced=True)


def test_budget_caps_the_period_and_settlement_counts_the_real_charge(on_db):
    kid = _key("b", budget=3 * WORST, budget_period="day")
    leases = [_reserve(kid) for _ in range(3)]
    assert _row(kid).budget_spent == 3 * WORST
    with pytest.raises(BudgetExceeded) as refused:
        _reserve(kid)
    err = refused.value
    assert (err.status, err.code, err.type) == (402, "budget_exceeded", "insufficient_quota")
    end = budget.period_end("day", datetime.datetime.now(UTC), UTC)
    assert end.isoformat() in err.message and 0 < int(err.headers["Retry-After"]) <= 86_400
    assert Usage.select().count() == 3                   # the refusal wrote nothing
    row = _row(kid)
    assert (row.balance, row.budget_spent) == (100_000_000 - 3 * WORST, 3 * WORST)

    charge = billing.settle(leases[0], _usage(2))        # the real charge is far below the worst case
    assert 0 < charge < WORST and _row(kid).budget_spent == 2 * WORST + charge
    with pytest.raises(BudgetExceeded):                  # still not room for a whole worst case
        _reserve(kid)
    billing.settle(leases[1], Outcome(status=503))       # failed upstream: nothing charged, nothing counted
    assert _row(kid).budget_spent == WORST + charge
    _reserve(kid)                                        # room again for one more
    assert _row(kid).budget_spent == 2 * WORST + charge
    ledger_check(on_db)


def test_balance_refusal_stays_insufficient_quota_and_free_models_pass(on_db):
    kid = _key("poor", credit="0.001", budget=100 * WORST, budget_period="month")
    with pytest.raises(InsufficientCredits) as refused:
        _reserve(kid)
    assert refused.value.code == "insufficient_quota"
    spent_out = _key("spent", budget=0, budget_period="week")
    with pytest.raises(BudgetExceeded):
        _reserve(spent_out)
    lease = _reserve(spent_out, model=FREE)             # free models spend nothing: a zero budget allows them
    billing.settle(lease, _usage(3))
    assert _row(spent_out).budget_spent == 0


def _roll_up_again() -> None:
    """After moving a settled ledger row in time by hand: the daily roll-up as the settlements would have made it."""
    UsageDay.delete().execute()
    schema.fill_usage_day()


def test_a_new_period_starts_the_count_afresh_and_old_rows_leave_it_alone(on_db):
    kid = _key("p", budget=2 * WORST, budget_period="day")
    yesterday = _reserve(kid)
    _reserve(kid)
    # the period began before these rows: move the key's count to "yesterday" as midnight would
    start = _row(kid).budget_period_start
    ApiKey.update(budget_period_start=start - datetime.timedelta(days=1)).where(ApiKey.id == kid).execute()
    for row in Usage.select():
        Usage.update(created_at=row.created_at - datetime.timedelta(days=1)).where(Usage.id == row.id).execute()
    yesterday.created_at -= datetime.timedelta(days=1)
    today = _reserve(kid)                                 # a new day: counted from zero
    row = _row(kid)
    assert (row.budget_spent, row.budget_period_start) == (WORST, start)
    billing.settle(yesterday, _usage(1))                  # yesterday's row settles today: today's count unmoved
    assert _row(kid).budget_spent == WORST
    charge = billing.settle(today, _usage(1))
    assert _row(kid).budget_spent == charge


def test_concurrent_reservations_never_pass_the_budget(on_db):
    kid = _key("race", budget=5 * WORST, budget_period="month")
    admitted, refused = [], []

    def worker():
        with db.connection_context():
            for _ in range(4):
                try:
                    admitted.append(_reserve(kid))
                except BudgetExceeded:
                    refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(admitted), len(refused)) == (5, 19)
    assert _row(kid).budget_spent == 5 * WORST
    ledger_check(on_db)


def test_a_dead_workers_rows_leave_the_count(on_db):
    kid = _key("lost", budget=2 * WORST, budget_period="day")
    lease = _reserve(kid)
    _reserve(kid)
    Usage.update(owner="dead:1").where(Usage.request_id == lease.request_id).execute()
    assert billing.settle_lost(["dead:1"]) == 1
    assert _row(kid).budget_spent == WORST
    _reserve(kid)                                        # its room is back
    ledger_check(on_db)


def test_setting_a_budget_counts_what_the_period_spent_already(on_db):
    kid = _key("late")
    done = _reserve(kid)
    charge = billing.settle(done, _usage(4))
    held = _reserve(kid)
    old = _reserve(kid)
    billing.settle(old, _usage(1))
    Usage.update(created_at=datetime.datetime(2020, 1, 1)).where(Usage.request_id == old.request_id).execute()
    _roll_up_again()
    keys.update("late", budget=charge + WORST + 1, budget_period="month", tz=PARIS)
    row = _row(kid)
    assert row.budget_spent == charge + WORST             # this month: the settled charge and the held worst case
    assert row.budget_period_start == budget.periods(datetime.datetime.now(UTC), PARIS).month
    with pytest.raises(BudgetExceeded):
        _reserve(kid, tz=PARIS)
    billing.settle(held, Outcome(status=503))            # the held row frees its part of the budget
    assert _row(kid).budget_spent == charge
    _reserve(kid, tz=PARIS)
    keys.update("late", budget=None)
    row = _row(kid)
    assert (row.budget, row.budget_period, row.budget_spent, row.budget_period_start) == (None, None, 0, None)
    with pytest.raises(ConfigurationError, match="budget-period"):
        keys.update("late", budget=10)
    ledger_check(on_db)


def test_key_summary_reports_the_budget(on_db):
    kid = _key("sum", budget=7_500_000, budget_period="week")
    _reserve(kid, tz=PARIS)
    out = billing.key_summary(kid, PARIS)
    now = datetime.datetime.now(UTC)
    assert out["budget"] == "7.5" and out["budget_period"] == "week"      # amounts: decimal strings
    assert out["budget_spent"] == amount(WORST)
    assert out["budget_resets_at"] == budget.period_end("week", now, PARIS).isoformat()
    assert datetime.datetime.fromisoformat(out["budget_resets_at"]).weekday() == 0
    plain = billing.key_summary(_key("none"))
    assert (plain["budget"], plain["budget_spent"], plain["budget_resets_at"]) == (None, None, None)
