"""
app.store.models
~~~~~~~~~~~~~~~~

The database: API keys, credit entries and the usage ledger, on SQLite, PostgreSQL or MySQL/MariaDB.

The database is deferred (:data:`db` is a proxy) and chosen from ``BOUNDLESS_DATABASE_URL`` by
:func:`init_app`. Connections come from a pool and are tied to the request. Money is integer micro-credits
(see app/accounting/credits.py); the ``CHECK`` constraint makes a negative balance impossible at the database level.
"""
from __future__ import annotations

import datetime
import time
from functools import cached_property
from typing import Callable
from typing import TypeVar

from flask import Flask
from peewee import AutoField
from peewee import BigIntegerField
from peewee import BooleanField
from peewee import CharField
from peewee import DateField
from peewee import Check
from peewee import DatabaseProxy
from peewee import DateTimeField
from peewee import FloatField
from peewee import ForeignKeyField
from peewee import IntegerField
from peewee import Model
from peewee import OperationalError
from peewee import SQL
from peewee import SmallIntegerField
from peewee import SqliteDatabase
from peewee import TextField
from peewee import __exception_wrapper__
from playhouse.db_url import connect as db_url_connect
from playhouse.db_url import register_database
from playhouse.pool import PooledSqliteDatabase

from .sqlite_busy import begin_immediate
from .sqlite_writer import WRITER

#: Version of the schema this code runs on; app/store/schema.py has the steps from each earlier version.
SCHEMA_VERSION = 7

db = DatabaseProxy()
T = TypeVar("T")

#: ``wal_autocheckpoint = 0``: checkpoints run in a background thread instead of inside some request's commit
#: (app/store/checkpoint.py), started by the first transaction of each process.
SQLITE_PRAGMAS = {"journal_mode": "wal", "busy_timeout": 10000, "synchronous": "normal", "foreign_keys": 1,
                  "wal_autocheckpoint": 0}


class _PooledSqliteDatabase(PooledSqliteDatabase):
    """peewee's pooled SQLite database, taking the write lock without SQLite's busy handler (see
    app/store/sqlite_busy.py): another worker's transaction is waited for in steps of 50 µs and up, not 1–10 ms."""

    def begin(self, lock_type=None):
        lock_type = lock_type or self._lock_type
        if (lock_type or "").upper() != "IMMEDIATE":
            return super().begin(lock_type)
        busy_ms = self._busy_ms
        with __exception_wrapper__:
            begin_immediate(self.connection(), busy_ms / 1000, busy_ms)

    @cached_property
    def _busy_ms(self) -> int:
        return int(dict(self._pragmas).get("busy_timeout", 10_000))


register_database(_PooledSqliteDatabase, "sqlite+pool")


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def make_database(url: str):
    """Build a pooled peewee database from a db_url (``sqlite:///``, ``postgresql://``, ``mysql://``).

    Pooled, so that a connection outlives the request that used it (threads and greenlets both). SQLite gets
    WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions, so a transaction that reads then writes waits
    for the write lock instead of failing with "database is locked".
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    if "+pool" not in scheme:
        scheme += "+pool"
    url = f"{scheme}://{rest}"
    opts: dict = {"max_connections": None, "stale_timeout": 300}
    if scheme.startswith("sqlite"):
        opts.update(pragmas=SQLITE_PRAGMAS, lock_type="IMMEDIATE", timeout=10, check_same_thread=False)
    elif scheme.startswith(("mysql", "mariadb")):
        opts.update(charset="utf8mb4")
    elif scheme.startswith(("postgres", "postgresql")):
        _cooperative_psycopg2()
    return db_url_connect(url, unquote_password=True, **opts)


def _cooperative_psycopg2() -> None:
    """Under gevent (the default worker), let psycopg2 wait for the server through gevent's ``select``.

    psycopg2 is C and would otherwise block the whole worker, every other request and stream, for each
    round trip. (PyMySQL, the Redis and memcached clients are pure Python: gevent's patched sockets already
    make them cooperative. SQLite calls are local and short.)
    """
    try:
        from gevent import monkey
    except ImportError:
        return
    if monkey.is_module_patched("select"):
        import psycopg2.extensions
        import psycopg2.extras
        psycopg2.extensions.set_wait_callback(psycopg2.extras.wait_select)


def run_write(op: Callable[[Callable], T], own_connection: bool = False) -> T:
    """Run ``op(execute)`` in a write transaction of the request path and return its result once committed.

    ``execute(sql, params)`` returns a cursor. SQLite: on this process's writer connection, possibly in one
    transaction with other requests' operations (group commit, app/store/sqlite_writer.py), so ``op`` must only run
    SQL and may run more than once. PostgreSQL and MySQL: ``db.atomic()`` on the pooled connection, checked
    out for this transaction alone with ``own_connection`` (outside a request: a stream's end, the heartbeat's
    retries). Database errors come out as peewee's exceptions either way.
    """
    database = db.obj
    if isinstance(database, SqliteDatabase):
        return WRITER.run(database, op)
    for attempt in range(DEADLOCK_RETRIES + 1):
        nested = not db.is_closed() and db.transaction_depth() > 0
        try:
            if own_connection:
                with db.connection_context(), db.atomic():
                    return op(db.execute_sql)
            with db.atomic():
                return op(db.execute_sql)
        except OperationalError as err:
            # InnoDB (and PostgreSQL) end one of two deadlocked transactions whole: the database's own advice is
            # to run it again. Only a transaction of our own can be: inside a caller's, the caller's is gone too.
            if nested or attempt == DEADLOCK_RETRIES or not _deadlock(err):
                raise
            time.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")


#: How many times a write transaction that lost a deadlock is run again (MySQL/MariaDB, PostgreSQL).
DEADLOCK_RETRIES = 3


def _deadlock(err: OperationalError) -> bool:
    """Whether ``err`` is a deadlock or lock wait timeout (MySQL 1213/1205, PostgreSQL 40P01/40001)."""
    orig = getattr(err, "orig", None) or err.__cause__
    code = getattr(orig, "pgcode", None)
    if code is not None:
        return code in ("40P01", "40001")
    args = getattr(orig, "args", ())
    return bool(args) and args[0] in (1213, 1205)


def backup_sqlite(conn, target: str) -> int:
    """Copy an open sqlite3 connection's database to ``target`` with SQLite's online backup API.

    The copy is a consistent snapshot even while other processes write (pages changed during the copy make
    the API restart that step). Returns the number of pages copied.
    """
    import sqlite3

    dest = sqlite3.connect(target)
    pages = 0

    def progress(status, remaining, total):
        nonlocal pages
        pages = total

    try:
        conn.backup(dest, pages=256, progress=progress)
    finally:
        dest.close()
    return pages


class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False


class ApiKey(BaseModel):
    """A caller's key: only its SHA-256 digest and a display prefix are stored."""

    id = AutoField()
    name = CharField(max_length=100, unique=True)
    key_hash = CharField(max_length=64, unique=True)
    prefix = CharField(max_length=16)
    rpm = IntegerField(null=True)          # None = the catalogue default; 0 = no limit (v3; the CLI's "none")
    rpd = IntegerField(null=True)
    balance = BigIntegerField(default=0, constraints=[Check("balance >= 0")])   # micro-credits
    spent = BigIntegerField(default=0)     # micro-credits charged so far
    revoked = BooleanField(default=False)
    created_at = DateTimeField(default=utcnow)
    revoked_at = DateTimeField(null=True)
    disabled = BooleanField(default=False)  # 401 key_disabled until enabled again; unlike revoked, undone (v3)
    # Per-key policy (v4, app/policy.py and app/accounting/budget.py):
    models = CharField(max_length=1000, null=True)   # comma-separated allow-list (`*` wildcards); NULL = every model
    expires_at = DateTimeField(null=True)            # UTC; from then on 401 key_expired; NULL = never
    budget = BigIntegerField(null=True)              # micro-credits per budget_period; NULL = no cap
    budget_period = CharField(max_length=5, null=True)   # day | week | month (calendar, in [limits] day_timezone)
    budget_spent = BigIntegerField(default=0)        # charged + held in the period starting at budget_period_start
    budget_period_start = DateTimeField(null=True)   # UTC start of the period budget_spent counts
    max_parallel = IntegerField(null=True)           # requests in flight at once; NULL = no cap
    admin = BooleanField(default=False)     # calls the admin API only (v5; `keys create --admin`)

    class Meta:
        table_name = "api_key"


class CreditEntry(BaseModel):
    """Every change to a balance that is not a charge: opening balance, top-ups, explicit settings."""

    id = AutoField()
    key = ForeignKeyField(ApiKey, backref="credit_entries", on_delete="CASCADE")
    amount = BigIntegerField()             # signed micro-credits
    kind = CharField(max_length=10)        # open | topup | set
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "credit_entry"


class Usage(BaseModel):
    """The ledger: one row per chat request that reached the upstream stage.

    ``state`` is ``held`` while a paid request's worst case is reserved, then ``settled`` with the real
    ``charge`` (and the rest of ``reserved`` given back) in one transaction.
    """

    id = AutoField()
    request_id = CharField(max_length=40, unique=True)
    key = ForeignKeyField(ApiKey, backref="usage", on_delete="CASCADE")
    model = CharField(max_length=200, index=True)
    created_at = DateTimeField(default=utcnow, index=True)
    state = CharField(max_length=8, default="held", index=True)    # held | settled
    stream = BooleanField(default=False)
    reserved = BigIntegerField(default=0)
    charge = BigIntegerField(default=0)
    prompt_tokens = IntegerField(default=0)
    completion_tokens = IntegerField(default=0)
    estimated = BooleanField(default=False)
    status = SmallIntegerField(null=True)   # HTTP status the upstream answered with (None: never answered)
    outcome = CharField(max_length=24, default="")   # complete | client_closed | upstream_cut | upstream_error ...
    latency_ms = FloatField(null=True)
    ttfb_ms = FloatField(null=True)
    owner = CharField(max_length=64, default="", index=True)   # instance:pid of the worker holding it (v2)
    # v4, filled when the row settles (the held row's INSERT leaves them to the database's defaults):
    answered_model = CharField(max_length=200, default="", constraints=[SQL("DEFAULT ''")])   # asked for or fallback
    provider = CharField(max_length=100, default="", constraints=[SQL("DEFAULT ''")])  # who answered; "": none
    attempts = SmallIntegerField(default=0, constraints=[SQL("DEFAULT 0")])   # upstream calls the request took

    class Meta:
        table_name = "usage"
        # failures(): the few rows that did not complete, in a time range (v7)
        indexes = ((("outcome", "created_at"), False),)


class UsageDay(BaseModel):
    """The settled ledger summed per key, UTC day and model (v7): what the usage report reads for whole days.

    Kept by one UPSERT in the same transaction as each settlement (app/accounting/billing.py), so it always
    equals the sums of the settled ledger rows of that (key, day, model); with a million ledger rows the
    report reads a few thousand of these instead (docs/benchmarks.md, "The ledger at scale").
    """

    id = AutoField()
    key = ForeignKeyField(ApiKey, backref="usage_days", on_delete="CASCADE")
    day = DateField()                       # DATE(created_at) of the ledger rows, UTC
    model = CharField(max_length=200)
    requests = BigIntegerField(default=0)
    prompt_tokens = BigIntegerField(default=0)
    completion_tokens = BigIntegerField(default=0)
    charge = BigIntegerField(default=0)     # micro-credits
    estimated = BigIntegerField(default=0)  # how many of the requests were charged on an estimate

    class Meta:
        table_name = "usage_day"
        indexes = ((("key", "day", "model"), True), (("day",), False))


class Heartbeat(BaseModel):
    """Each worker's last sign of life; held rows of owners silent for a minute are settled as lost (v2)."""

    owner = CharField(max_length=64, primary_key=True)
    seen_at = DateTimeField(index=True)

    class Meta:
        table_name = "heartbeat"


class Refusal(BaseModel):
    """How many requests of a key were refused after authentication, per UTC day, model and reason (v3).

    One row per (key, day, model, reason), counted up by one atomic upsert per refusal
    (app/server/refusals.py): the usage report shows refusals without a ledger row for each.
    """

    id = AutoField()
    key = ForeignKeyField(ApiKey, backref="refusals", on_delete="CASCADE")
    day = DateField()                       # UTC, as the ledger's days in `boundless usage`
    model = CharField(max_length=200, default="")    # "" when the request was refused before naming one
    reason = CharField(max_length=32)       # rate_limited | insufficient_quota | key_disabled | invalid_request ...
    count = BigIntegerField(default=0)

    class Meta:
        table_name = "refusal"
        indexes = ((("key", "day", "model", "reason"), True),)


class AuditEntry(BaseModel):
    """One change made through the admin API or the console (v5): who, what, to what, when."""

    id = AutoField()
    at = DateTimeField(default=utcnow, index=True)
    actor = CharField(max_length=120)       # "key:NAME" (an admin key) or "console:USER"
    action = CharField(max_length=40)       # key.create | key.update | key.topup | key.revoke ...
    target = CharField(max_length=200, default="")
    detail = TextField(default="")          # the changed fields, as JSON (never a key)

    class Meta:
        table_name = "audit_entry"


class ConsoleUser(BaseModel):
    """Who may sign in to the web console (v5): a name and a Werkzeug password hash."""

    id = AutoField()
    name = CharField(max_length=100, unique=True)
    password_hash = CharField(max_length=255)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "console_user"


class SchemaInfo(BaseModel):
    id = IntegerField(primary_key=True)
    version = IntegerField()

    class Meta:
        table_name = "schema_info"


MODELS = (ApiKey, CreditEntry, Usage, UsageDay, Heartbeat, Refusal, AuditEntry, ConsoleUser, SchemaInfo)


def init_app(app: Flask) -> None:
    """Bind :data:`db` to the configured database and tie a pooled connection to each request."""
    db.initialize(make_database(app.config["BOUNDLESS_DATABASE_URL"]))

    @app.teardown_request
    def _release_connection(exc):         # may run twice for a streamed response; must be idempotent
        if not db.is_closed():
            db.close()
