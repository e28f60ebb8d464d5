"""Schema upgrades keep every row; the server refuses a schema it does not know; SQLite backups while serving;
held rows of dead workers are settled."""
from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
import threading
import time

import pytest
import requests
from peewee import AutoField
from peewee import BigIntegerField
from peewee import BooleanField
from peewee import CharField
from peewee import Check
from peewee import DateTimeField
from peewee import FloatField
from peewee import ForeignKeyField
from peewee import IntegerField
from peewee import Model
from peewee import SmallIntegerField

from app.store.models import SCHEMA_VERSION
from app.store.models import make_database
from support import ledger_check

MSG = [{"role": "user", "content": "hello there"}]
OLD_KEY = "sk-" + "o" * 43
ZERO_KEY = "sk-" + "z" * 43


# The first released schema (version 1), frozen here as it shipped.
class V1Key(Model):
    id = AutoField()
    name = CharField(max_length=100, unique=True)
    key_hash = CharField(max_length=64, unique=True)
    prefix = CharField(max_length=16)
    rpm = IntegerField(null=True)
    rpd = IntegerField(null=True)
    balance = BigIntegerField(default=0, constraints=[Check("balance >= 0")])
    spent = BigIntegerField(default=0)
    revoked = BooleanField(default=False)
    created_at = DateTimeField()
    revoked_at = DateTimeField(null=True)

    class Meta:
        table_name = "api_key"


class V1Credit(Model):
    id = AutoField()
    key = ForeignKeyField(V1Key, on_delete="CASCADE")
    amount = BigIntegerField()
    kind = CharField(max_length=10)
    created_at = DateTimeField()

    class Meta:
        table_name = "credit_entry"


class V1Usage(Model):
    id = AutoField()
    request_id = CharField(max_length=40, unique=True)
    key = ForeignKeyField(V1Key, on_delete="CASCADE")
    model = CharField(max_length=200, index=True)
    created_at = DateTimeField(index=True)
    state = CharField(max_length=8, default="held", index=True)
    stream = BooleanField(default=False)
    reserved = BigIntegerField(default=0)
    charge = BigIntegerField(default=0)
    prompt_tokens = IntegerField(default=0)
    completion_tokens = IntegerField(default=0)
    estimated = BooleanField(default=False)
    status = SmallIntegerField(null=True)
    outcome = CharField(max_length=24, default="")
    latency_ms = FloatField(null=True)
    ttfb_ms = FloatField(null=True)

    class Meta:
        table_name = "usage"


class V1Info(Model):
    id = IntegerField(primary_key=True)
    version = IntegerField()

    class Meta:
        table_name = "schema_info"


V1 = (V1Key, V1Credit, V1Usage, V1Info)


def make_v1(url: str) -> None:
    """A version-1 database with a key, its credit history and two settled ledger rows."""
    database = make_database(url)
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    with database.bind_ctx(V1), database.connection_context():
        database.create_tables(V1)
        key = V1Key.create(name="old", key_hash=hashlib.sha256(OLD_KEY.encode()).hexdigest(), prefix=OLD_KEY[:8],
                           rpm=7, balance=4_000_000, spent=1_000_000, created_at=now)
        # the old CLI took --rpd 0: a key that could never call (issue 19.6); v3 makes it a disabled key
        V1Key.create(name="zero", key_hash=hashlib.sha256(ZERO_KEY.encode()).hexdigest(), prefix=ZERO_KEY[:8],
                     rpd=0, created_at=now)
        V1Credit.create(key=key, amount=5_000_000, kind="open", created_at=now)
        for i, charge in enumerate((400_000, 600_000)):
            V1Usage.create(request_id=f"req_old{i}", key=key, model="paid-model", created_at=now, state="settled",
                           charge=charge, prompt_tokens=10, completion_tokens=20, status=200, outcome="complete")
        V1Info.create(id=1, version=1)
    database.close()


def test_upgrade_from_the_first_released_schema(gateway_factory, database, tmp_path, mock):
    make_v1(database.url)
    from support import Gateway
    gw = Gateway(tmp_path / "gw", mock.url, database_url=database.url)

    # the CLI and the server both refuse the old schema and say which command to run
    res = gw.cli("keys", "list", check=False)
    assert res.returncode != 0 and "boundless db upgrade" in res.stderr
    with pytest.raises(RuntimeError, match="boundless db upgrade"):
        gw.start()

    steps = ", ".join(str(v) for v in range(2, SCHEMA_VERSION + 1))
    assert gw.cli("db", "upgrade").stdout == f"upgraded the schema to version {SCHEMA_VERSION} (steps {steps})\n"
    assert "already current" in gw.cli("db", "upgrade").stdout

    gw = gateway_factory(database_url=database.url)
    listed = gw.cli("keys", "list").stdout
    assert "old" in listed and "4" in listed
    listed = {r["name"]: r for r in json.loads(gw.cli("keys", "list", "--json").stdout)}
    assert (listed["old"]["state"], listed["old"]["rpm"], listed["old"]["rpd"]) == ("active", 7, 50)
    assert (listed["zero"]["state"], listed["zero"]["rpd"]) == ("disabled", 50)     # still cannot call, and says why
    zero = requests.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {ZERO_KEY}"}, timeout=10)
    assert zero.status_code == 401 and zero.json()["error"]["code"] == "key_disabled"
    gw.cli("keys", "enable", "zero")
    assert requests.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {ZERO_KEY}"},
                        timeout=10).status_code == 200
    resp = requests.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {OLD_KEY}"}, timeout=10)
    assert resp.status_code == 200
    assert resp.json()["data"]["balance"] == "4" and resp.json()["data"]["spent"] == "1" and resp.json()["data"]["rpm"] == 7
    out = gw.client(OLD_KEY).chat.completions.create(model="paid-model", messages=MSG, max_tokens=20)
    assert out.choices[0].message.content.startswith("tok0")
    by_model = gw.cli("usage", "--by", "model", "--json").stdout
    assert '"requests": 3' in by_model
    # v4: an old key has no policy (every model, no expiry, no budget, no cap) until one is given
    data = requests.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {OLD_KEY}"}, timeout=10).json()["data"]
    assert (data["models"], data["expires_at"], data["budget"], data["max_parallel"]) == (["*"], None, None, None)
    gw.cli("keys", "update", "old", "--models", "free-*", "--budget", "0.5", "--budget-period", "month",
           "--max-parallel", "3", "--expires", "30d")
    listed = {r["name"]: r for r in json.loads(gw.cli("keys", "list", "--json").stdout)}["old"]
    assert (listed["models"], listed["budget"], listed["max_parallel"]) == (["free-*"], "0.5", 3)
    refused = requests.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {OLD_KEY}"},
                            json={"model": "paid-model", "messages": MSG}, timeout=10)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    ledger_check(database.url)


def test_newer_schema_is_refused(gateway_factory, tmp_path, mock):
    from support import Gateway
    gw = Gateway(tmp_path / "gw", mock.url)
    gw.cli("keys", "create", "--name", "x")
    conn = sqlite3.connect(gw.database_url[len("sqlite:///"):])
    conn.execute("UPDATE schema_info SET version = 99")
    conn.commit()
    conn.close()
    res = gw.cli("keys", "list", check=False)
    assert res.returncode != 0 and "newer than this Boundless" in res.stderr


def test_backup_while_serving(gateway_factory, tmp_path):
    gw = gateway_factory(rpm=10_000, rpd=10_000)
    key = gw.create_key("b", credit=100)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            requests.post(gw.base_url + "/chat/completions", timeout=10, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "paid-model", "messages": MSG, "max_tokens": 10})

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        copies = []
        for i in range(3):
            target = tmp_path / f"copy{i}.db"
            assert "backed up" in gw.cli("db", "backup", str(target)).stdout
            copies.append(target)
    finally:
        stop.set()
        for t in threads:
            t.join()
    for target in copies:
        conn = sqlite3.connect(target)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        ledger_check(f"sqlite:///{target}")           # each copy is a consistent snapshot of the money
    assert gw.cli("db", "backup", str(copies[0]), check=False).returncode != 0    # never overwrites


def test_recover_settles_rows_of_silent_or_dead_workers(gateway_factory):
    gw = gateway_factory()
    gw.create_key("r", credit=10)
    path = gw.database_url[len("sqlite:///"):]
    conn = sqlite3.connect(path)
    old = "2026-01-01 00:00:00"
    with conn:
        kid = conn.execute("SELECT id FROM api_key WHERE name = 'r'").fetchone()[0]
        conn.execute("UPDATE api_key SET balance = balance - 6000000 WHERE id = ?", (kid,))
        insert = ("INSERT INTO usage (request_id, key_id, model, created_at, state, stream, reserved, charge, "
                  "prompt_tokens, completion_tokens, estimated, outcome, owner) VALUES "
                  "(?, ?, 'paid-model', ?, 'held', 1, 2000000, 0, 0, 0, 0, '', ?)")
        conn.execute(insert, ("req_silent", kid, old, "gone-box:41"))       # no heartbeat at all
        conn.execute(insert, ("req_alive", kid, old, "live-box:42"))        # beats: must be left alone
        conn.execute(insert, ("req_exited", kid, old, "live-box:43"))       # its master saw it exit
        conn.execute("INSERT INTO heartbeat (owner, seen_at) VALUES ('live-box:42', datetime('now'))")
        conn.execute("INSERT INTO heartbeat (owner, seen_at) VALUES ('live-box:43', datetime('now'))")
    conn.close()

    assert "settled 1 request" in gw.cli("db", "recover").stdout
    assert "settled 1 request" in gw.cli("db", "recover", "--owner", "live-box:43").stdout
    assert gw.cli("db", "recover").stdout == ""           # nothing left: nothing printed (issue 19.4)
    conn = sqlite3.connect(path)
    rows = dict((r, (st, ch, oc)) for r, st, ch, oc in conn.execute(
        "SELECT request_id, state, charge, outcome FROM usage WHERE request_id LIKE 'req_%'"))
    assert rows["req_silent"] == ("settled", 0, "worker_lost")
    assert rows["req_exited"] == ("settled", 0, "worker_lost")
    assert rows["req_alive"][0] == "held"
    assert conn.execute("SELECT balance FROM api_key WHERE id = ?", (kid,)).fetchone()[0] == 10_000_000 - 2_000_000
    with conn:      # settle the live one as its worker would, so the ledger identity can be checked
        conn.execute("UPDATE usage SET state = 'settled' WHERE request_id = 'req_alive'")
        conn.execute("INSERT INTO usage_day (key_id, day, model, requests, prompt_tokens, completion_tokens, "
                     "charge, estimated) VALUES (?, '2026-01-01', 'paid-model', 1, 0, 0, 0, 0) ON CONFLICT "
                     "(key_id, day, model) DO UPDATE SET requests = requests + 1", (kid,))
        conn.execute("UPDATE api_key SET balance = balance + 2000000 WHERE id = ?", (kid,))
    conn.close()
    ledger_check(gw.database_url)


def test_workers_beat(gateway_factory):
    gw = gateway_factory(workers=2)
    path = gw.database_url[len("sqlite:///"):]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        conn = sqlite3.connect(path)
        owners = [o for (o,) in conn.execute("SELECT owner FROM heartbeat")]
        conn.close()
        if len(owners) == 2:
            break
        time.sleep(0.2)
    assert len(owners) == 2 and len({o.split(":")[0] for o in owners}) == 1     # one instance, two workers


def make_v6(url: str) -> None:
    """A version-6 database (v7 without the daily roll-up and the outcome index) with a key and settled
    ledger rows on two days, one estimated, one failed, and a held one."""
    from app.store import schema
    from app.store.models import ApiKey
    from app.store.models import CreditEntry
    from app.store.models import SchemaInfo
    from app.store.models import Usage
    from app.store.models import db

    db.initialize(make_database(url))
    with db.connection_context():
        schema.create()
        db.execute_sql('DROP TABLE {0}usage_day{1}'.format(*db.quote))
        db.execute_sql('DROP INDEX {0}usage_outcome_created_at{1}'.format(*db.quote)
                       + (' ON {0}usage{1}'.format(*db.quote) if db.quote[0] == "`" else ""))
        SchemaInfo.update(version=6).execute()
        key = ApiKey.create(name="old", key_hash=hashlib.sha256(OLD_KEY.encode()).hexdigest(), prefix=OLD_KEY[:8],
                            balance=3_000_000, spent=1_500_000)
        CreditEntry.create(key=key, amount=5_000_000, kind="open")
        day1, day2 = datetime.datetime(2026, 1, 2, 23, 59, 59), datetime.datetime(2026, 1, 3, 0, 0, 0)
        for i, (at, model, charge, estimated, outcome) in enumerate((
                (day1, "paid-model", 400_000, False, "complete"), (day1, "paid-model", 600_000, True, "client_closed"),
                (day2, "paid-model", 500_000, False, "complete"), (day2, "other", 0, False, "upstream_error"))):
            Usage.create(request_id=f"req_v5_{i}", key=key, model=model, created_at=at, state="settled", charge=charge,
                         prompt_tokens=10 + i, completion_tokens=20, estimated=estimated, status=200, outcome=outcome)
        Usage.create(request_id="req_v5_held", key=key, model="paid-model", created_at=day2, state="held",
                     reserved=500_000)
    db.close()


def test_upgrade_from_v6_fills_the_daily_roll_up(gateway_factory, database, tmp_path, mock):
    make_v6(database.url)
    from support import Gateway
    gw = Gateway(tmp_path / "gw", mock.url, database_url=database.url)
    assert gw.cli("db", "upgrade").stdout == "upgraded the schema to version 7 (step 7)\n"
    ledger_check(database.url)                 # the roll-up holds the settled rows' sums, not the held one

    by_day = {r["day"]: r for r in json.loads(gw.cli("usage", "--json").stdout)}
    assert (by_day["2026-01-02"]["requests"], by_day["2026-01-02"]["credits"], by_day["2026-01-02"]["estimated"],
            by_day["2026-01-03"]["requests"], by_day["2026-01-03"]["credits"]) == (2, "1", 1, 2, "0.5")
    # a since/until with a time of day: the partial days come from the ledger rows, whole days from the roll-up
    partial = json.loads(gw.cli("usage", "--by", "model", "--since", "2026-01-02T23:00:00",
                                "--until", "2026-01-03T00:00:01", "--json").stdout)
    assert {(r["model"], r["requests"], r["prompt_tokens"]) for r in partial} == {
        ("paid-model", 3, 10 + 11 + 12), ("other", 1, 13)}
    only_second = json.loads(gw.cli("usage", "--by", "key", "--since", "2026-01-02T23:59:59.5", "--json").stdout)
    assert [(r["key"], r["requests"], r["credits"]) for r in only_second] == [("old", 2, "0.5")]

    gw = gateway_factory(database_url=database.url)
    gw.client(OLD_KEY).chat.completions.create(model="paid-model", messages=MSG, max_tokens=20)
    ledger_check(database.url)                 # the settlement added itself to today's roll-up row
    total = json.loads(gw.cli("usage", "--by", "key", "--json").stdout)
    # 4 settled before, the held row of a worker long silent (settled as lost by the gateway), the new one
    assert [(r["key"], r["requests"]) for r in total] == [("old", 6)]
