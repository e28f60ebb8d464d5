"""app.accounting.ledger_sql: each database gets the statements of its own dialect."""
from __future__ import annotations

import gc

from peewee import DatabaseProxy
from peewee import MySQLDatabase
from peewee import PostgresqlDatabase
from peewee import SqliteDatabase

from app.accounting.ledger_sql import statements


def test_each_dialect_its_own_quotes_and_parameters():
    lite, pg, my = SqliteDatabase(":memory:"), PostgresqlDatabase("x"), MySQLDatabase("x")
    assert statements(lite).take == 'UPDATE "api_key" SET "balance" = "balance" - ? WHERE "id" = ? AND "balance" >= ?'
    assert statements(pg).take == 'UPDATE "api_key" SET "balance" = "balance" - %s WHERE "id" = %s AND "balance" >= %s'
    assert statements(my).take == "UPDATE `api_key` SET `balance` = `balance` - %s WHERE `id` = %s AND `balance` >= %s"
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
