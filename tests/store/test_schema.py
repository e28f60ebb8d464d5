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

    assert gw.cli("db", "upgrade").stdout == "upgraded the schema to version 4 (steps 2, 3, 4)\n"
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
    assert resp.json()["data"]["balance"] == 4 and resp.json()["data"]["spent"] == 1 and resp.json()["data"]["rpm"] == 7
    out = gw.client(OLD_KEY).chat.completions.create(model="paid-model", messages=MSG, max_tokens=20)
    assert out.choices[0].message.content.startswith("tok0")
    by_model = gw.cli("usage", "--by", "model", "--json").stdout
    assert '"requests": 3' in by_model
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
