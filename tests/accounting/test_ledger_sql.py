"""app.accounting.ledger_sql: each database gets the statements of its own dialect."""
from __future__ import annotations

import datetime
import gc

from peewee import DatabaseProxy
from peewee import MySQLDatabase
from peewee import PostgresqlDatabase
from peewee import SqliteDatabase

from app.accounting import budget
from app.accounting.ledger_sql import give_back_args
from app.accounting.ledger_sql import statements
from app.accounting.ledger_sql import take_args


def test_each_dialect_its_own_quotes_and_parameters():
    lite, pg, my = SqliteDatabase(":memory:"), PostgresqlDatabase("x"), MySQLDatabase("x")
    take = statements(lite).take
    assert take.startswith('UPDATE "api_key" SET "balance" = "balance" - ?, "budget_spent" = CASE')
    assert 'WHERE "id" = ? AND "balance" >= ? AND ("budget" IS NULL OR' in take     # the key's budget (v4) too
    assert statements(pg).take == take.replace("?", "%s")
    assert statements(my).take == take.replace("?", "%s").replace('"', "`")
    assert take.count("?") == len(take_args(1, 1, budget.periods(datetime.datetime.now(datetime.timezone.utc),
                                                                  datetime.timezone.utc)))
    assert statements(lite).give_back.count("?") == len(give_back_args(0, 0, 0, None, 1))
    assert statements(lite).lock_key is None and statements(pg).lock_key.endswith("FOR UPDATE")
    assert statements(lite) is statements(lite)          # built once per database


def test_the_proxy_gives_its_current_database_statements():
    proxy = DatabaseProxy()
    lite, pg = SqliteDatabase(":memory:"), PostgresqlDatabase("x")
    proxy.initialize(lite)
    assert statements(proxy) is statements(lite)
    proxy.initialize(pg)
    assert statements(proxy) is statements(pg) and "%s" in statements(proxy).take


def test_a_new_database_never_gets_a_dead_ones_statements():
    """A database made where a freed one lived (CPython reuses the address, so the same ``id()``) must not get
    the freed one's statements: once, PostgreSQL got SQLite's ``?`` placeholders this way in the test suite."""
    for _ in range(50):
        lite = SqliteDatabase(":memory:")
        assert "?" in statements(lite).take
        del lite
        gc.collect()
        pg = PostgresqlDatabase("x")
        assert "?" not in statements(pg).take and "%s" in statements(pg).take
        del pg
        gc.collect()
