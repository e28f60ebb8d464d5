"""
app.accounting.ledger_sql
~~~~~~~~~~~~~~~~~~~~~~~~~

The statements every paid request runs (reserve, hold, settle the row, settle the key, and the rare extra
charge), as plain SQL.

peewee builds a query's SQL anew on every ``execute()``; on this path that cost more CPU than the database
work itself (about a third of the gateway's time per request, profiled). These statements never change, so
they are written once per database, quoted and parametrised for its dialect, and run with
``execute_sql``. Everything else keeps using the models.
"""
from __future__ import annotations

from peewee import Database

#: The attribute of a peewee database that holds its statements (on the object itself: a cache keyed by
#: ``id()`` handed a freed database's statements to a new one made at the same address, of another dialect).
_ATTR = "_boundless_statements"


class Statements:
    """SQL text for one database (its identifier quotes and parameter style)."""

    def __init__(self, database: Database) -> None:
        open_q, close_q = database.quote[0], database.quote[1]
        p = database.param

        def q(name: str) -> str:
            return f"{open_q}{name}{close_q}"

        key, usage = q("api_key"), q("usage")
        # The balance and the key's budget (app/accounting/budget.py) in one conditional UPDATE. ``start`` is the
        # start of the key's current period, picked by its budget_period from the three passed in. MySQL runs
        # a SET list left to right with the new values, so budget_spent is set before budget_period_start.
        budget, spent, start_col = q("budget"), q("budget_spent"), q("budget_period_start")
        start = f"(CASE {q('budget_period')} WHEN 'day' THEN {p} WHEN 'week' THEN {p} ELSE {p} END)"
        self.take = (f"UPDATE {key} SET {q('balance')} = {q('balance')} - {p}, "
                     f"{spent} = CASE WHEN {budget} IS NULL THEN {spent} "
                     f"WHEN {start_col} = {start} THEN {spent} + {p} ELSE {p} END, "
                     f"{start_col} = CASE WHEN {budget} IS NULL THEN {start_col} ELSE {start} END "
                     f"WHERE {q('id')} = {p} AND {q('balance')} >= {p} AND ({budget} IS NULL OR "
                     f"(CASE WHEN {start_col} = {start} THEN {spent} ELSE 0 END) + {p} <= {budget})")
        hold_columns = ("request_id", "key_id", "model", "created_at", "state", "stream", "reserved", "charge",
                        "prompt_tokens", "completion_tokens", "estimated", "outcome", "owner")
        self.hold = (f"INSERT INTO {usage} ({', '.join(q(c) for c in hold_columns)}) "
                     f"VALUES ({', '.join([p] * len(hold_columns))})")
        settle_columns = ("state", "charge", "prompt_tokens", "completion_tokens", "estimated", "status",
                          "outcome", "latency_ms", "ttfb_ms", "answered_model", "provider", "attempts")
        self.settle_row = (f"UPDATE {usage} SET {', '.join(f'{q(c)} = {p}' for c in settle_columns)} "
                           f"WHERE {q('request_id')} = {p} AND {q('state')} = {p}")
        # The period's spending moves by (charge - reserved) only for a row made in the period it counts.
        self.give_back = (f"UPDATE {key} SET {q('balance')} = {q('balance')} + {p}, "
                          f"{q('spent')} = {q('spent')} + {p}, "
                          f"{spent} = CASE WHEN {start_col} <= {p} THEN {spent} + {p} - {p} ELSE {spent} END "
                          f"WHERE {q('id')} = {p}")
        self.lock_key = (f"SELECT {q('id')} FROM {key} WHERE {q('id')} = {p} FOR UPDATE"
                         if database.for_update else None)
        self.balance = (f"SELECT {q('balance')} FROM {key} WHERE {q('id')} = {p}"
                        + (" FOR UPDATE" if database.for_update else ""))
        self.take_up_to = f"UPDATE {key} SET {q('balance')} = {q('balance')} - {p} WHERE {q('id')} = {p}"
        self.set_charge = f"UPDATE {usage} SET {q('charge')} = {p} WHERE {q('request_id')} = {p}"
        # The daily roll-up (app/store/models.py UsageDay): one UPSERT per settled row, adding it to its
        # (key, day, model). MySQL names no conflict target: the unique index is it.
        sums = ("requests", "prompt_tokens", "completion_tokens", "charge", "estimated")
        day_table = q("usage_day")
        insert = (f"INSERT INTO {day_table} ({q('key_id')}, {q('day')}, {q('model')}, "
                  f"{', '.join(q(c) for c in sums)}) VALUES ({', '.join([p] * (3 + len(sums)))}) ")
        if database.quote[0] == "`":
            self.roll_up = insert + "ON DUPLICATE KEY UPDATE " + ", ".join(
                f"{q(c)} = {q(c)} + VALUES({q(c)})" for c in sums)
        else:
            self.roll_up = (insert + f"ON CONFLICT ({q('key_id')}, {q('day')}, {q('model')}) DO UPDATE SET "
                            + ", ".join(f"{q(c)} = {day_table}.{q(c)} + excluded.{q(c)}" for c in sums))


def take_args(worst: int, key_id: int, periods) -> tuple:
    """The parameters of :attr:`Statements.take`, in their order in its text (``periods``: budget.Periods)."""
    starts = (periods.day, periods.week, periods.month)
    return (worst, *starts, worst, worst, *starts, key_id, worst, *starts, worst)


def lock_key(database: Database, execute, key_id: int) -> None:
    """Lock the key's row for the rest of this transaction (on PostgreSQL and MySQL; SQLite's ``BEGIN
    IMMEDIATE`` already serialises writers). Take it before the ledger row, the order reserve() takes them in:
    the other order deadlocks on MySQL/MariaDB, where an UPDATE's next-key lock on ``usage`` blocks a concurrent
    reserve's INSERT while that reserve holds the key's row, which the settling transaction then waits for.
    """
    sql = statements(database).lock_key
    if sql:
        execute(sql, (key_id,)).fetchall()


def give_back_args(returned: int, charge: int, reserved: int, created_at, key_id: int) -> tuple:
    """The parameters of :attr:`Statements.give_back`: ``created_at`` is the ledger row's (None: no budget move)."""
    return (returned, charge, created_at, charge, reserved, key_id)


def roll_up_args(key_id: int, created_at, model: str, prompt: int, completion: int, charge: int,
                 estimated: bool) -> tuple:
    """The parameters of :attr:`Statements.roll_up` for one settled ledger row made at ``created_at`` (naive
    UTC): its day as ``YYYY-MM-DD``, which every database reads as a date."""
    return (key_id, created_at.date().isoformat(), model[:200], 1, prompt, completion, charge, int(bool(estimated)))


def statements(database: Database) -> Statements:
    """The statements for ``database`` (a peewee database or the proxy's current one), built once."""
    database = getattr(database, "obj", database)
    stmts = getattr(database, _ATTR, None)
    if stmts is None:
        stmts = Statements(database)
        setattr(database, _ATTR, stmts)
    return stmts
