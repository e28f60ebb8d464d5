"""The ``boundless`` command as operators run it: a subprocess on a database named by BOUNDLESS_DATABASE_URL.

keys create | list | update | topup | revoke, and the usage report. A gateway runs only where the point is that
the CLI works while the server runs on the same database.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from app import keys as keyadmin
from app.store import schema
from app.accounting.credits import to_credits
from app.store.models import ApiKey
from app.store.models import CreditEntry
from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from support import BIN
from support import PROVIDER_KEY
from support import ledger_check
from support import write_catalog

KEY_RE = re.compile(r"^sk-[A-Za-z0-9_-]{32,}$")


class Cli:
    """``boundless`` against one database and catalogue."""

    def __init__(self, tmp: Path, database_url: str | None = None) -> None:
        self.tmp = tmp
        self.database_url = database_url or f"sqlite:///{tmp / 'cli.db'}"
        self.catalog = write_catalog(tmp / "catalog.toml", "http://127.0.0.1:9/v1")
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("BOUNDLESS_")},
                    "BOUNDLESS_DATABASE_URL": self.database_url, "BOUNDLESS_CONFIG": str(self.catalog),
                    "MOCK_PROVIDER_KEY": PROVIDER_KEY}

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([str(BIN / "boundless"), *args], env=self.env, capture_output=True, text=True,
                             timeout=60)
        if ok and res.returncode != 0:
            raise AssertionError(f"boundless {' '.join(args)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        assert "Traceback" not in res.stderr, res.stderr
        return res

    def many(self, *argvs: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
        """Run independent commands at once (read-only ones, or refusals); results in order."""
        procs = [subprocess.Popen([str(BIN / "boundless"), *argv], env=self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for argv in argvs]
        out = []
        for argv, proc in zip(argvs, procs):
            stdout, stderr = proc.communicate(timeout=60)
            assert "Traceback" not in stderr, stderr
            out.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
        return out

    def refusals(self, *argvs: tuple[str, ...], code: int = 1) -> list[str]:
        """Run commands that must each be refused with ``code``; return their messages."""
        results = self.many(*argvs)
        for res in results:
            assert res.returncode == code, (res.args, res.returncode, res.stdout, res.stderr)
        return [res.stderr for res in results]

    def fails(self, *args: str, code: int = 1) -> str:
        """Run a command that must be refused; return its message (stderr)."""
        res = self(*args, ok=False)
        assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
        return res.stderr

    def create(self, name: str, *opts: str) -> str:
        res = self("keys", "create", "--name", name, *opts)
        key = res.stdout.strip()
        assert KEY_RE.match(key), res.stdout
        return key

    def listing(self) -> dict[str, dict]:
        return {row["name"]: row for row in json.loads(self("keys", "list", "--json").stdout)}

    @contextlib.contextmanager
    def db(self):
        db.initialize(make_database(self.database_url))
        try:
            with db.connection_context():
                yield
        finally:
            db.close_all()


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)


def table(stdout: str) -> list[list[str]]:
    """The rows of a printed table (header first), split on runs of 2+ spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------

def test_create_prints_the_key_once_stores_only_its_hash_and_lists_balances(cli, tmp_path):
    res = cli("keys", "create", "--name", "alice", "--credit", "12.5", "--rpm", "3", "--rpd", "9")
    key = res.stdout.strip()
    assert res.stdout == key + "\n"                  # stdout is the key and nothing else (scriptable)
    assert KEY_RE.match(key) and len(key) >= 3 + 32
    assert "cannot be shown again" in res.stderr
    other = cli.create("bob")
    assert other != key

    listing, listing_json = cli.many(("keys", "list"), ("keys", "list", "--json"))
    for out in (listing.stdout, listing_json.stdout):
        assert key not in out and key[8:] not in out and other[8:] not in out
        assert key[:8] + "..." in out                 # the display prefix only
    rows = table(listing.stdout)
    assert rows[0] == ["NAME", "PREFIX", "RPM", "RPD", "BALANCE", "SPENT", "STATE"]
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["alice"][2:] == ["3", "9", "12.5", "0", "active"]
    assert by_name["bob"][2:] == ["20", "50", "0", "0", "active"]        # the catalogue's defaults
    listed = {r["name"]: r for r in json.loads(listing_json.stdout)}
    assert listed["alice"] == {"name": "alice", "prefix": key[:8] + "...", "rpm": 3, "rpd": 9,
                               "balance": "12.5", "spent": "0", "state": "active"}

    with cli.db():
        row = ApiKey.get(ApiKey.name == "alice")
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert row.prefix == key[:8] and row.balance == 12_500_000
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("cli.db*"))     # the file, its WAL and shm
    assert raw and key.encode() not in raw and key[8:].encode() not in raw
    assert hashlib.sha256(key.encode()).hexdigest().encode() in raw
    ledger_check(cli.database_url)


def test_names_are_unique_and_bad_input_is_refused(cli):
    cli.create("carol", "--credit", "1")
    duplicate, seven, negative, word = cli.refusals(
        ("keys", "create", "--name", "carol", "--credit", "5"),
        ("keys", "create", "--name", "dave", "--credit", "1.0000001"),
        ("keys", "create", "--name", "dave", "--credit", "-5"),
        ("keys", "create", "--name", "dave", "--credit", "lots"))
    assert "carol" in duplicate and "already exists" in duplicate
    assert "more than 6 decimals" in seven
    assert "negative" in negative
    assert "not an amount" in word
    listed = cli.listing()
    assert list(listed) == ["carol"] and listed["carol"]["balance"] == "1"      # nothing else was written
    ledger_check(cli.database_url)


def test_topup_and_update(cli):
    cli.create("gina", "--credit", "12.5")
    assert "balance 12.75" in cli("keys", "topup", "gina", "0.25").stdout
    negative, zero, seven, nobody, huge = cli.refusals(
        ("keys", "topup", "gina", "--", "-1"),          # "-1" alone would be read as an option by click
        ("keys", "topup", "gina", "0"),
        ("keys", "topup", "gina", "0.0000001"),
        ("keys", "topup", "nobody", "1"),
        ("keys", "topup", "gina", "1e30"))              # a clean refusal, not a database overflow traceback
    assert "positive" in negative and "positive" in zero
    assert "more than 6 decimals" in seven and "no key named" in nobody
    assert "too large" in huge

    cli("keys", "update", "gina", "--credit", "3", "--rpm", "7")
    refused = cli.refusals(("keys", "update", "gina", "--credit", "-1"),
                           ("keys", "update", "nobody", "--credit", "1"))
    assert "negative" in refused[0] and "no key named" in refused[1]
    assert "nothing to change" in cli.fails("keys", "update", "gina", code=2)
    listed = cli.listing()["gina"]
    assert (listed["balance"], listed["rpm"], listed["rpd"]) == ("3", 7, 50)

    with cli.db():
        entries = [(e.kind, e.amount) for e in CreditEntry.select().order_by(CreditEntry.id)]
    assert entries == [("open", 12_500_000), ("topup", 250_000), ("set", -9_750_000)]
    ledger_check(cli.database_url)


def test_revoke(cli):
    cli.create("hank")
    assert "revoked" in cli("keys", "revoke", "hank").stdout
    nobody, again = cli.refusals(("keys", "revoke", "nobody"), ("keys", "create", "--name", "hank"))
    assert "no key named" in nobody
    assert "already exists" in again                  # a revoked name stays taken
    assert cli.listing()["hank"]["state"] == "revoked"


# --------------------------------------------------------------------------------------------------
# usage
# --------------------------------------------------------------------------------------------------

def _ledger(cli: Cli) -> None:
    """Two keys' rows over three days (times UTC), charged consistently with their balances."""
    t = datetime.datetime
    rows = [  # key, model, when, prompt, completion, charge (micro), estimated, state
        ("ivy", "paid-model", t(2024, 3, 1, 0, 0, 1), 10, 5, 20_000, False, "settled"),
        ("ivy", "free-model", t(2024, 3, 1, 10, 30), 7, 3, 0, False, "settled"),
        ("jack", "paid-model", t(2024, 3, 1, 23, 59, 59), 100, 50, 200_000, True, "settled"),
        ("ivy", "paid-model", t(2024, 3, 2, 0, 0), 1, 1, 3_000, False, "settled"),
        ("jack", "free-model", t(2024, 3, 5, 12, 0), 4, 4, 0, False, "settled"),
        ("jack", "paid-model", t(2024, 3, 5, 13, 0), 0, 0, 0, False, "held"),       # in flight: not reported
    ]
    with cli.db():
        schema.create()
        keyadmin.create("ivy", credit="10")
        keyadmin.create("jack", credit="10")
        for name, model, when, pt, ct, charge, est, state in rows:
            key = ApiKey.get(ApiKey.name == name)
            reserved = 50_000 if state == "held" else charge
            Usage.insert(request_id="req_" + uuid.uuid4().hex, key=key, model=model, created_at=when, state=state,
                         reserved=reserved, charge=charge if state == "settled" else 0, prompt_tokens=pt,
                         completion_tokens=ct, estimated=est, status=200, outcome="complete").execute()
            ApiKey.update(balance=ApiKey.balance - reserved,
                          spent=ApiKey.spent + (charge if state == "settled" else 0)).where(
                ApiKey.id == key.id).execute()
    ledger_check(cli.database_url)


def test_usage_report(cli):
    _ledger(cli)
    by_day, by_model, by_key, one_key, since, until, window, bad = cli.many(
        ("usage",),
        ("usage", "--by", "model", "--json"),
        ("usage", "--by", "key"),
        ("usage", "--key", "jack", "--model", "paid-model", "--by", "model", "--json"),
        ("usage", "--since", "2024-03-02", "--json"),
        ("usage", "--until", "2024-03-01", "--key", "ivy", "--json"),
        # 12:00+02:00 is 10:00 UTC, so the 10:30 UTC row is in; an ISO --until is exclusive
        ("usage", "--since", "2024-03-01T12:00:00+02:00", "--until", "2024-03-02T00:00:00", "--by", "key", "--json"),
        ("usage", "--since", "March"))

    rows = table(by_day.stdout)
    assert rows == [["DAY", "REQUESTS", "PROMPT", "COMPLETION", "CREDITS", "ESTIMATED"],
                    ["2024-03-01", "3", "117", "58", "0.22", "1"],
                    ["2024-03-02", "1", "1", "1", "0.003", "0"],
                    ["2024-03-05", "1", "4", "4", "0", "0"],
                    ["TOTAL", "5", "122", "63", "0.223", "1"]]
    assert json.loads(by_model.stdout) == [
        {"model": "free-model", "requests": 2, "prompt_tokens": 11, "completion_tokens": 7, "credits": 0,
         "estimated": 0},
        {"model": "paid-model", "requests": 3, "prompt_tokens": 111, "completion_tokens": 56, "credits": 0.223,
         "estimated": 1}]
    assert table(by_key.stdout) == [["KEY", "REQUESTS", "PROMPT", "COMPLETION", "CREDITS", "ESTIMATED"],
                                     ["ivy", "3", "18", "9", "0.023", "0"],
                                     ["jack", "2", "104", "54", "0.2", "1"],
                                     ["TOTAL", "5", "122", "63", "0.223", "1"]]
    assert json.loads(one_key.stdout) == [
        {"model": "paid-model", "requests": 1, "prompt_tokens": 100, "completion_tokens": 50, "credits": 0.2,
         "estimated": 1}]
    assert [(r["day"], r["requests"]) for r in json.loads(since.stdout)] == [("2024-03-02", 1), ("2024-03-05", 1)]
    assert [(r["day"], r["requests"], r["credits"]) for r in json.loads(until.stdout)] == [("2024-03-01", 2, 0.02)]
    assert json.loads(window.stdout) == [
        {"key": "ivy", "requests": 1, "prompt_tokens": 7, "completion_tokens": 3, "credits": 0, "estimated": 0},
        {"key": "jack", "requests": 1, "prompt_tokens": 100, "completion_tokens": 50, "credits": 0.2,
         "estimated": 1}]
    assert bad.returncode == 2 and "not a date" in bad.stderr


@pytest.mark.parametrize("database", ["postgres", "mariadb"], indirect=True)
def test_usage_report_on_server_databases(database, tmp_path):
    cli = Cli(tmp_path, database.url)
    _ledger(cli)
    by_day, by_key = cli.many(("usage", "--json"), ("usage", "--by", "key", "--since", "2024-03-02", "--json"))
    assert [(r["day"], r["requests"], r["credits"]) for r in json.loads(by_day.stdout)] == [
        ("2024-03-01", 3, 0.22), ("2024-03-02", 1, 0.003), ("2024-03-05", 1, 0)]
    assert [(r["key"], r["requests"], r["estimated"]) for r in json.loads(by_key.stdout)] == [
        ("ivy", 1, 0), ("jack", 1, 0)]


# --------------------------------------------------------------------------------------------------
# while the gateway runs
# --------------------------------------------------------------------------------------------------

def test_cli_works_while_the_gateway_runs(gateway_factory, tmp_path):
    gw = gateway_factory(workers=2, ratelimit_storage=f"sqlite:///{tmp_path / 'ratelimit.db'}")
    http = requests.Session()
    http.trust_env = False

    def chat(key: str, model: str):
        return http.post(gw.base_url + "/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})

    key = gw.cli("keys", "create", "--name", "live", "--rpm", "100").stdout.strip()
    assert KEY_RE.match(key)
    assert chat(key, "free-model").status_code == 200
    assert chat(key, "paid-model").status_code == 402
    gw.cli("keys", "topup", "live", "1")
    paid = chat(key, "paid-model")
    assert paid.status_code == 200
    charge = paid.json()["usage"]["prompt_tokens"] * 1000 + paid.json()["usage"]["completion_tokens"] * 2000

    report = json.loads(gw.cli("usage", "--json", "--by", "model", "--key", "live").stdout)
    assert [(r["model"], r["requests"]) for r in report] == [("free-model", 1), ("paid-model", 1)]
    assert report[1]["credits"] == charge / 1_000_000
    listed = {r["name"]: r for r in json.loads(gw.cli("keys", "list", "--json").stdout)}
    assert listed["live"]["spent"] == str(to_credits(charge))

    gw.cli("keys", "revoke", "live")
    refused = chat(key, "free-model")                  # BOUNDLESS_KEY_CACHE_SECONDS=0 in the test gateway
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert http.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 401
    ledger_check(gw.database_url)
