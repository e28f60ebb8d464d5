"""
Test support: run the gateway as users do (gunicorn over HTTP, the ``boundless`` CLI) and the real services
it talks to (a fake upstream on 127.0.0.1, memcached, PostgreSQL, MariaDB, Redis).
"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

#: The provider key the fake upstream must receive (and no caller may ever see).
PROVIDER_KEY = "prov-sk-" + "p" * 40

#: Prices of the paid test model, credits per 1M tokens: 1 prompt token = 1,000 micro-credits,
#: 1 completion token = 2,000 micro-credits.
PAID_IN, PAID_OUT = 1000, 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers every GET and POST with what it received, as JSON: method, path, headers, body."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        out = json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers),
                          "body": body.decode()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def echo_server():
    """A plain HTTP/1.1 server on 127.0.0.1 that echoes each request (see ``_Echo``); yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def events_with_times(resp: requests.Response) -> list[tuple[float, str]]:
    """(arrival time, event) for each SSE event of a streamed response, read as the bytes arrive."""
    buf, out = b"", []
    while chunk := resp.raw.read1(65536):
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            out.append((time.monotonic(), ev.decode()))
    return out


def write_catalog(path: Path, upstream_url: str, rpm: int = 20, rpd: int = 50, tz: str = "UTC",
                  extra: str = "") -> Path:
    path.write_text(textwrap.dedent(f"""\
        [limits]
        rpm = {rpm}
        rpd = {rpd}
        day_timezone = "{tz}"

        [providers.mock]
        base_url = "{upstream_url}"
        api_key_env = "MOCK_PROVIDER_KEY"

        [models."free-model"]
        provider = "mock"
        upstream_model = "mock-model"
        owned_by = "mock-owner"

        [models."paid-model"]
        provider = "mock"
        upstream_model = "mock-paid"
        input_price = {PAID_IN}
        output_price = {PAID_OUT}
        max_output_tokens = 100
        """) + extra)
    return path


# --------------------------------------------------------------------------------------------------
# Databases
# --------------------------------------------------------------------------------------------------

class Database:
    """A fresh, empty database of one kind, dropped at the end."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.name = "bl_" + uuid.uuid4().hex[:12]
        if kind == "sqlite":
            self.url = f"sqlite:///{tmp / 'boundless.db'}"
        elif kind == "postgres":
            import psycopg2
            conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="test")
            conn.autocommit = True
            conn.cursor().execute(f"CREATE DATABASE {self.name}")
            conn.close()
            self.url = f"postgresql://postgres@127.0.0.1:5432/{self.name}"
        elif kind == "mariadb":
            import pymysql
            conn = pymysql.connect(host="127.0.0.1", user="root", password="")
            conn.cursor().execute(f"CREATE DATABASE {self.name}")
            conn.close()
            self.url = f"mysql://root@127.0.0.1:3306/{self.name}"
        else:
            raise ValueError(kind)

    def drop(self) -> None:
        try:
            if self.kind == "postgres":
                import psycopg2
                conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="test")
                conn.autocommit = True
                conn.cursor().execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
                conn.close()
            elif self.kind == "mariadb":
                import pymysql
                conn = pymysql.connect(host="127.0.0.1", user="root", password="")
                conn.cursor().execute(f"DROP DATABASE IF EXISTS {self.name}")
                conn.close()
        except Exception:   # a leftover test database is not worth failing a test for
            pass


# --------------------------------------------------------------------------------------------------
# memcached
# --------------------------------------------------------------------------------------------------

class Memcached:
    """A private memcached on a free port (the package is installed by .ci/run)."""

    def __init__(self) -> None:
        exe = shutil.which("memcached") or "/usr/bin/memcached"
        if not os.path.exists(exe):
            raise RuntimeError("memcached is not installed: apt-get install -y memcached (see README)")
        self.port = free_port()
        self.proc = subprocess.Popen([exe, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64",
                                      "-u", "root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        self.uri = f"memcached://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def flush_redis(db: int) -> str:
    import redis
    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
    return f"redis://127.0.0.1:6379/{db}"


# --------------------------------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------------------------------

class Gateway:
    """One gateway instance: gunicorn with the shipped gunicorn.conf.py, on a free port."""

    def __init__(self, tmp: Path, upstream_url: str, database_url: str | None = None,
                 ratelimit_storage: str = "", workers: int = 2, rpm: int = 20, rpd: int = 50,
                 tz: str = "UTC", env: dict | None = None, catalog_extra: str = "") -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.catalog = write_catalog(tmp / "catalog.toml", upstream_url, rpm, rpd, tz, catalog_extra)
        self.database_url = database_url or f"sqlite:///{tmp / 'boundless.db'}"
        self.workers = workers
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BOUNDLESS_")},
            "BOUNDLESS_CONFIG": str(self.catalog),
            "BOUNDLESS_DATABASE_URL": self.database_url,
            "BOUNDLESS_RATELIMIT_STORAGE": ratelimit_storage,
            "BOUNDLESS_KEY_CACHE_SECONDS": "0",
            "BOUNDLESS_UPSTREAM_READ_TIMEOUT": "5",
            "MOCK_PROVIDER_KEY": PROVIDER_KEY,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = tmp / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/api/v1"

    def start(self, port: int | None = None) -> "Gateway":
        self.port = port or free_port()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), "--chdir", str(ROOT),
             "-b", f"127.0.0.1:{self.port}", "-w", str(self.workers), "--no-control-socket", "wsgi:app"],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.base_url + "/models", timeout=1).status_code == 401:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc:
            self._log.close()
        return self.proc.returncode if self.proc else None

    def restart(self) -> "Gateway":
        self.stop()
        return self.start(self.port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([str(BIN / "boundless"), *args], env=self.env, capture_output=True, text=True,
                             timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"boundless {' '.join(args)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        return res

    def create_key(self, name: str | None = None, **opts) -> str:
        args = ["keys", "create", "--name", name or ("k-" + uuid.uuid4().hex[:8])]
        for opt, value in opts.items():
            args += [f"--{opt}"] if value is True else [f"--{opt}", str(value)]
        return self.cli(*args).stdout.strip()

    def client(self, key: str, **kw):
        import openai
        return openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=0, **kw)

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def rolled_up_check() -> None:
    """Check that the daily roll-up (usage_day) holds, for every (key, UTC day, model), the sums of the
    settled ledger rows: requests, tokens, charges, estimated (on the bound ``db``)."""
    from peewee import Case
    from peewee import fn

    from app.store.models import Usage
    from app.store.models import UsageDay

    def plain(day):
        return str(day)[:10]

    ledger = {(k, plain(d), m): (int(n), int(p), int(c), int(ch), int(e)) for k, d, m, n, p, c, ch, e in (
        Usage.select(Usage.key, fn.DATE(Usage.created_at).coerce(False), Usage.model, fn.COUNT(Usage.id),
                     fn.SUM(Usage.prompt_tokens), fn.SUM(Usage.completion_tokens), fn.SUM(Usage.charge),
                     fn.SUM(Case(None, [(Usage.estimated == True, 1)], 0)))     # noqa: E712
        .where(Usage.state == "settled")
        .group_by(Usage.key, fn.DATE(Usage.created_at), Usage.model).tuples())}
    rolled = {(r.key_id, plain(r.day), r.model): (r.requests, r.prompt_tokens, r.completion_tokens, r.charge,
                                                   r.estimated) for r in UsageDay.select()}
    assert rolled == ledger, f"the daily roll-up differs from the ledger: {rolled} != {ledger}"


def ledger_check(database_url: str) -> dict:
    """Check, straight in the database, that for every key: entries - charges - held = balance, and
    charges = spent, and that the daily roll-up sums the settled ledger (:func:`rolled_up_check`); return {key name: (balance, spent)} in micro-credits."""
    from peewee import fn

    from app.store.models import ApiKey
    from app.store.models import CreditEntry
    from app.store.models import Usage
    from app.store.models import db
    from app.store.models import make_database

    db.initialize(make_database(database_url))
    out = {}
    with db.connection_context():
        for key in ApiKey.select():
            entries = CreditEntry.select(fn.COALESCE(fn.SUM(CreditEntry.amount), 0)).where(
                CreditEntry.key == key).scalar()
            charges = Usage.select(fn.COALESCE(fn.SUM(Usage.charge), 0)).where(
                (Usage.key == key) & (Usage.state == "settled")).scalar()
            held = Usage.select(fn.COALESCE(fn.SUM(Usage.reserved), 0)).where(
                (Usage.key == key) & (Usage.state == "held")).scalar()
            assert key.balance >= 0, f"{key.name}: negative balance {key.balance}"
            assert int(entries) - int(charges) - int(held) == key.balance, (
                f"{key.name}: entries {entries} - charges {charges} - held {held} != balance {key.balance}")
            assert int(charges) == key.spent, f"{key.name}: charges {charges} != spent {key.spent}"
            out[key.name] = (key.balance, key.spent)
        rolled_up_check()
    db.close()
    return out
