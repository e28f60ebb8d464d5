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
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from app import keys as keyadmin
from app.store import schema
from app.accounting.credits import to_credits
from app.accounting.ledger_sql import roll_up_args
from app.accounting.ledger_sql import statements
from app.store.models import ApiKey
from app.store.models import CreditEntry
from app.store.models import Refusal
from app.store.models import SCHEMA_VERSION
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
    assert rows[0] == ["NAME", "PREFIX", "RPM", "RPD", "BALANCE", "SPENT", "STATE", "MODELS", "EXPIRES", "BUDGET",
                       "PARALLEL"]
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["alice"][2:] == ["3", "9", "12.5", "0", "active", "*", "-", "-", "-"]   # no policy: no restriction
    assert by_name["bob"][2:] == ["20", "50", "0", "0", "active", "*", "-", "-", "-"]      # the catalogue's defaults
    listed = {r["name"]: r for r in json.loads(listing_json.stdout)}
    assert listed["alice"] == {"name": "alice", "prefix": key[:8] + "...", "rpm": 3, "rpd": 9,
                               "balance": "12.5", "spent": "0", "state": "active", "admin": False, "models": ["*"],
                               "expires_at": None, "budget": None, "budget_period": None, "budget_spent": None,
                               "max_parallel": None}

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
    assert "nothing to change" in cli.fails("keys", "update", "gina")     # every failure exits 1 (issue 19.1)
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
            if state == "settled":          # the settlement's daily roll-up (schema v7), as billing.settle adds it
                db.execute_sql(statements(db).roll_up, roll_up_args(key.id, when, model, pt, ct, charge, est))
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
    assert rows == [["DAY", "REQUESTS", "PROMPT", "COMPLETION", "CREDITS", "ESTIMATED", "REFUSED"],
                    ["2024-03-01", "3", "117", "58", "0.22", "1", "0"],
                    ["2024-03-02", "1", "1", "1", "0.003", "0", "0"],
                    ["2024-03-05", "1", "4", "4", "0", "0", "0"],
                    ["TOTAL", "5", "122", "63", "0.223", "1", "0"]]
    assert json.loads(by_model.stdout) == [
        {"model": "free-model", "requests": 2, "prompt_tokens": 11, "completion_tokens": 7, "credits": "0",
         "estimated": 0, "refused": {}},
        {"model": "paid-model", "requests": 3, "prompt_tokens": 111, "completion_tokens": 56, "credits": "0.223",
         "estimated": 1, "refused": {}}]
    assert table(by_key.stdout) == [["KEY", "REQUESTS", "PROMPT", "COMPLETION", "CREDITS", "ESTIMATED", "REFUSED"],
                                     ["ivy", "3", "18", "9", "0.023", "0", "0"],
                                     ["jack", "2", "104", "54", "0.2", "1", "0"],
                                     ["TOTAL", "5", "122", "63", "0.223", "1", "0"]]
    assert json.loads(one_key.stdout) == [
        {"model": "paid-model", "requests": 1, "prompt_tokens": 100, "completion_tokens": 50, "credits": "0.2",
         "estimated": 1, "refused": {}}]
    assert [(r["day"], r["requests"]) for r in json.loads(since.stdout)] == [("2024-03-02", 1), ("2024-03-05", 1)]
    assert [(r["day"], r["requests"], r["credits"]) for r in json.loads(until.stdout)] == [("2024-03-01", 2, "0.02")]
    assert json.loads(window.stdout) == [
        {"key": "ivy", "requests": 1, "prompt_tokens": 7, "completion_tokens": 3, "credits": "0", "estimated": 0,
         "refused": {}},
        {"key": "jack", "requests": 1, "prompt_tokens": 100, "completion_tokens": 50, "credits": "0.2",
         "estimated": 1, "refused": {}}]
    assert bad.returncode == 1 and "not a date" in bad.stderr        # every failure exits 1 (issue 19.1)


@pytest.mark.parametrize("database", ["postgres", "mariadb"], indirect=True)
def test_usage_report_on_server_databases(database, tmp_path):
    cli = Cli(tmp_path, database.url)
    _ledger(cli)
    by_day, by_key = cli.many(("usage", "--json"), ("usage", "--by", "key", "--since", "2024-03-02", "--json"))
    assert [(r["day"], r["requests"], r["credits"]) for r in json.loads(by_day.stdout)] == [
        ("2024-03-01", 3, "0.22"), ("2024-03-02", 1, "0.003"), ("2024-03-05", 1, "0")]
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
    assert report[1]["credits"] == str(to_credits(charge))
    listed = {r["name"]: r for r in json.loads(gw.cli("keys", "list", "--json").stdout)}
    assert listed["live"]["spent"] == str(to_credits(charge))

    gw.cli("keys", "revoke", "live")
    refused = chat(key, "free-model")                  # BOUNDLESS_KEY_CACHE_SECONDS=0 in the test gateway
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert http.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 401
    ledger_check(gw.database_url)


# --------------------------------------------------------------------------------------------------
# the first hour (issue 19): mistakes a new operator makes get one clear line, never a traceback
# --------------------------------------------------------------------------------------------------

def _one_line_errors(results: list[subprocess.CompletedProcess]) -> list[str]:
    """Each result failed with exit 1 and exactly one stderr line ``Error: ...``; return those lines."""
    lines = []
    for res in results:
        assert res.returncode == 1, (res.args, res.returncode, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr, (res.args, res.stderr)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("Error: "), (res.args, res.stderr)
        lines.append(res.stderr)
    return lines


def test_every_command_refuses_a_bad_argument_in_one_line(cli, tmp_path):
    cli.create("me")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        cases = {
            ("serve", "--bind", "nonsense"): "is not HOST:PORT",
            ("serve", "--bind", "127.0.0.1:99999"): "port must be a number from 1 to 65535",
            ("serve", "--bind", f"127.0.0.1:{busy_port}"): "already in use",
            ("serve", "--bind", "no-such-host.invalid:8000"): "not a known name",
            ("serve", "--bind", "unix:/no/such/dir/s.sock"): "does not exist",
            ("serve", "--workers", "0"): "--workers",
            ("keys", "create"): "--name",
            ("keys", "create", "--name", "x", "--rpm", "0"): "boundless keys disable NAME",
            ("keys", "create", "--name", "x", "--rpd", "-3"): "positive number",
            ("keys", "create", "--name", "x", "--rpm", "lots"): "positive number",
            ("keys", "list", "--bogus"): "--bogus",
            ("keys", "update", "nobody", "--rpm", "5"): "no key named 'nobody'",
            ("keys", "update", "me", "--rpd", "0"): "boundless keys disable NAME",
            ("keys", "topup", "me", "-5"): "boundless keys update NAME --credit",
            ("keys", "topup", "me", "0"): "boundless keys update NAME --credit",
            ("keys", "topup", "me"): "AMOUNT",
            ("keys", "revoke", "nobody"): "no key named",
            ("keys", "disable", "nobody"): "no key named",
            ("keys", "enable", "nobody"): "no key named",
            ("usage", "--key", "nosuchkey"): "no key named 'nosuchkey'",
            ("usage", "--model", "nosuchmodel"): "no model named 'nosuchmodel'",
            ("usage", "--by", "week"): "week",
            ("usage", "--since", "March"): "--since",
            ("db", "backup", "/no/such/dir/x.db"): "/no/such/dir does not exist",
            ("db", "recover", "--silent", "soon"): "soon",
            ("nosuchcommand",): "nosuchcommand",
        }
        lines = _one_line_errors(cli.many(*cases))
    for (argv, expected), line in zip(cases.items(), lines):
        assert expected in line, (argv, line)
    assert list(cli.listing()) == ["me"]                 # nothing was created by the refused commands


def test_a_bad_setting_or_an_unreachable_database_is_one_line(cli, tmp_path):
    bad_catalog = tmp_path / "unset.toml"
    bad_catalog.write_text(cli.catalog.read_text().replace("http://127.0.0.1:9/v1", "${NO_SUCH_VAR_19}"))
    runs = [({"BOUNDLESS_DATABASE_URL": "nonsense"}, ("keys", "list"), "not usable"),
            ({"BOUNDLESS_DATABASE_URL": "postgresql://postgres:hunter2@127.0.0.1:1/x"}, ("db", "upgrade"),
             "postgresql://postgres:***@127.0.0.1:1/x"),
            ({"BOUNDLESS_MAX_BODY_BYTES": "lots"}, ("keys", "list"), "not valid"),
            ({"BOUNDLESS_CONFIG": str(bad_catalog)}, ("serve", "--bind", "127.0.0.1:1"), "NO_SUCH_VAR_19")]
    procs = [subprocess.Popen([str(BIN / "boundless"), *argv], env={**cli.env, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env, argv, _ in runs]
    results = [subprocess.CompletedProcess(p.args, p.wait(60), p.stdout.read(), p.stderr.read()) for p in procs]
    for (env, argv, expected), line in zip(runs, _one_line_errors(results)):
        assert expected in line, (env, argv, line)
        assert "hunter2" not in line


def test_version_and_help_list_every_command():
    from app.cli import main as cli_main
    from importlib.metadata import version

    version_out = subprocess.run([str(BIN / "boundless"), "--version"], capture_output=True, text=True, timeout=60)
    assert version_out.returncode == 0 and version_out.stdout == f"boundless {version('boundless')}\n"
    help_out = subprocess.run([str(BIN / "boundless"), "--help"], capture_output=True, text=True, timeout=60)
    assert help_out.returncode == 0
    lines = help_out.stdout.splitlines()
    commands = _leaf_commands(cli_main)
    assert len(commands) >= 12
    for path, cmd in commands.items():
        listed = [line for line in lines if re.match(rf"\s+{re.escape(path)}\s{{2,}}\S", line)]
        assert len(listed) == 1, (path, help_out.stdout)
        # one line each: the short help is on it, and the next line is another command
        assert cmd.get_short_help_str(limit=60).rstrip(".") in listed[0]
        following = lines[lines.index(listed[0]) + 1:lines.index(listed[0]) + 2]
        assert not following or re.match(r"\s+[\w-]+( [\w-]+)?\s{2,}\S", following[0]), following


def _leaf_commands(group, prefix: str = "") -> dict:
    import click
    out = {}
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out.update(_leaf_commands(cmd, f"{prefix}{name} "))
        else:
            out[prefix + name] = cmd
    return out


def test_readme_cli_table_lists_every_command_and_option():
    from app.cli import main as cli_main
    from support import ROOT as REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## CLI"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| `boundless ")]
    for path, cmd in _leaf_commands(cli_main).items():
        row = [r for r in rows if r.startswith(f"| `boundless {path}")]
        assert len(row) == 1, f"README's CLI table has no row for `boundless {path}`"
        for param in cmd.params:
            if param.name == "help":
                continue
            name = param.opts[0] if param.param_type_name == "option" else param.human_readable_name
            assert name in row[0], f"README's row for `boundless {path}` does not show {name}"
    quick = readme[readme.index("## Quick start"):readme.index("## Run the tests")]
    assert "--bind" in quick and "instance/boundless.db" in quick and "BOUNDLESS_DATABASE_URL" in quick
    offline = readme[readme.index("### Offline"):readme.index("## Run the tests")]
    assert "MOCK_UPSTREAM_URL" in offline and "--port" in offline


def test_create_says_where_the_key_lives(cli):
    res = cli("keys", "create", "--name", "here")
    assert cli.database_url in res.stderr and "cannot be shown again" in res.stderr


def test_limits_none_default_and_disable(cli):
    cli.create("u", "--rpm", "none", "--rpd", "5")
    cli.create("d")
    listed = cli.listing()
    assert (listed["u"]["rpm"], listed["u"]["rpd"]) == (None, 5)          # null: no limit
    assert "none" in table(cli("keys", "list").stdout)[1]
    cli("keys", "update", "u", "--rpm", "default", "--rpd", "none")
    assert (cli.listing()["u"]["rpm"], cli.listing()["u"]["rpd"]) == (20, None)

    assert cli("keys", "disable", "d").stdout == "disabled key 'd'\n"
    assert "already disabled" in cli("keys", "disable", "d").stdout
    assert cli.listing()["d"]["state"] == "disabled"
    assert cli("keys", "enable", "d").stdout == "enabled key 'd'\n"
    assert cli.listing()["d"]["state"] == "active"
    cli("keys", "revoke", "d")
    (revoked,) = _one_line_errors(cli.many(("keys", "enable", "d")))
    assert "revoked" in revoked and cli.listing()["d"]["state"] == "revoked"


def test_usage_counts_refusals_by_reason(cli):
    _ledger(cli)
    with cli.db():
        ivy, jack = ApiKey.get(ApiKey.name == "ivy"), ApiKey.get(ApiKey.name == "jack")
        for key, day, model, reason, n in [(ivy, datetime.date(2024, 3, 1), "paid-model", "rate_limited", 3),
                                           (ivy, datetime.date(2024, 3, 1), "paid-model", "insufficient_quota", 1),
                                           (jack, datetime.date(2024, 3, 4), "", "key_disabled", 2)]:
            Refusal.create(key=key, day=day, model=model, reason=reason, count=n)
    by_day, by_key, ivy_only, since = cli.many(("usage",), ("usage", "--by", "key", "--json"),
                                               ("usage", "--key", "ivy", "--by", "model", "--json"),
                                               ("usage", "--since", "2024-03-02T10:00:00", "--json"))
    rows = table(by_day.stdout)
    assert rows[0][-1] == "REFUSED"
    assert rows[1] == ["2024-03-01", "3", "117", "58", "0.22", "1", "4"]
    assert rows[3] == ["2024-03-04", "0", "0", "0", "0", "0", "2"]      # a day with refusals only
    assert rows[5] == ["TOTAL", "5", "122", "63", "0.223", "1", "6"]
    assert rows[6] == ["DAY", "REFUSED BECAUSE", "REQUESTS"]
    assert rows[7:] == [["2024-03-01", "insufficient_quota", "1"], ["2024-03-01", "rate_limited", "3"],
                        ["2024-03-04", "key_disabled", "2"]]
    assert {r["key"]: r["refused"] for r in json.loads(by_key.stdout)} == {
        "ivy": {"rate_limited": 3, "insufficient_quota": 1}, "jack": {"key_disabled": 2}}
    assert {r["model"]: r["refused"] for r in json.loads(ivy_only.stdout)} == {
        "free-model": {}, "paid-model": {"rate_limited": 3, "insufficient_quota": 1}}
    assert {r["day"]: r["refused"] for r in json.loads(since.stdout)} == {
        "2024-03-04": {"key_disabled": 2}, "2024-03-05": {}}


def test_db_messages_speak_in_the_singular_for_one(tmp_path):
    cli = Cli(tmp_path)
    assert cli("db", "upgrade").stdout == f"upgraded the schema to version {SCHEMA_VERSION} (step {SCHEMA_VERSION})\n"
    assert cli("db", "recover").stdout == ""           # quiet when nothing was left held
