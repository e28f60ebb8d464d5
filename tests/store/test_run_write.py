"""app.store.models.run_write on MariaDB: a write transaction that loses a real InnoDB deadlock is run again,
whole, instead of failing the request (seen as a flaky `test_concurrent_reserve_and_settle_on_one_key[mariadb]`
once the settlement also upserts the daily roll-up)."""
from __future__ import annotations

import threading

import pytest

from app.store import schema
from app.store.models import db
from app.store.models import make_database
from app.store.models import run_write
from support import Database


@pytest.fixture
def mariadb(tmp_path):
    database = Database("mariadb", tmp_path)
    db.initialize(make_database(database.url))
    with db.connection_context():
        schema.create()
        db.execute_sql("CREATE TABLE pair (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        db.execute_sql("INSERT INTO pair VALUES (1, 0), (2, 0)")
    yield database
    db.close_all()
    database.drop()


def test_the_loser_of_a_deadlock_is_run_again(mariadb):
    """Two transactions lock rows 1 and 2 in opposite orders, each waiting for the other at a barrier: InnoDB
    ends one with error 1213. Both must still commit, each exactly once (the loser's second run)."""
    barrier = threading.Barrier(2, timeout=10)
    runs = {"a": 0, "b": 0}
    errors: list[BaseException] = []

    def op_for(name: str, first: int, second: int):
        def op(execute):
            runs[name] += 1
            execute("UPDATE pair SET n = n + 1 WHERE id = %s", (first,))
            if runs[name] == 1:               # only the first run meets the other at the barrier
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    pass
            execute("UPDATE pair SET n = n + 1 WHERE id = %s", (second,))
        return op

    def worker(name: str, first: int, second: int) -> None:
        try:
            with db.connection_context():
                run_write(op_for(name, first, second))
        except BaseException as err:          # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=worker, args=("a", 1, 2)), threading.Thread(target=worker, args=("b", 2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(runs.values()) == [1, 2]    # one won at once, the deadlock's loser ran a second time
    with db.connection_context():
        assert db.execute_sql("SELECT n FROM pair ORDER BY id").fetchall() == ((2,), (2,))
