"""
app.store.schema
~~~~~~~~~~~~~~~~

Creating, checking and upgrading the database schema.

A fresh database is created at the current version. A database at an older version is refused until
``boundless db upgrade`` has run; one at a newer version (written by a newer Boundless) is refused outright.
Upgrades are numbered steps in :data:`STEPS`, each a function of a ``playhouse.migrate`` migrator.
"""
from __future__ import annotations

from typing import Callable

from peewee import CharField
from peewee import Database
from peewee import PostgresqlDatabase
from peewee import PeeweeException
from playhouse.migrate import SchemaMigrator

from ..errors import ConfigurationError
from .models import MODELS
from .models import ApiKey
from .models import AuditEntry
from .models import ConsoleUser
from .models import Refusal
from .models import Heartbeat
from .models import SCHEMA_VERSION
from .models import SchemaInfo
from .models import UsageDay
from .models import db


def _v2_owner_and_heartbeat(migrator: SchemaMigrator) -> list:
    """v2: ledger rows name the worker holding them, and workers beat, so a dead worker's reservations can
    be found and settled."""
    migrator.database.create_tables([Heartbeat], safe=True)
    return [migrator.add_column("usage", "owner", CharField(max_length=64, default="")),
            migrator.add_index("usage", ("owner",), False)]


def _v3_disabled_unlimited_refusals(migrator: SchemaMigrator) -> list:
    """v3: keys can be disabled (and enabled again); a stored limit of 0 now means "no limit"; refused
    requests are counted per key, day and reason.

    Before v3 the CLI accepted ``--rpm 0``/``--rpd 0``, which made a key that could never call. Such keys
    become disabled keys with the catalogue's limits (NULL), so none of them can call more than before and
    ``boundless keys list`` says why; ``boundless keys enable NAME`` opens them.
    """
    database = migrator.database
    database.create_tables([Refusal], safe=True)
    # One ALTER TABLE ... NOT NULL DEFAULT, not playhouse's add_column: on SQLite that rebuilds a NOT NULL
    # column's table (copy, DROP, rename), and dropping api_key with foreign keys on cascades to its
    # credit entries and ledger rows.
    false = "FALSE" if isinstance(database, PostgresqlDatabase) else "0"
    return [lambda: database.execute_sql(f"ALTER TABLE api_key ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT {false}"),
            lambda: _v3_zero_limits_to_disabled(database)]


def _v3_zero_limits_to_disabled(database: Database) -> None:
    with database.bind_ctx([ApiKey]):
        zero = (ApiKey.rpm == 0) | (ApiKey.rpd == 0)
        ApiKey.update(disabled=True).where(zero).execute()
        ApiKey.update(rpm=None).where(ApiKey.rpm == 0).execute()
        ApiKey.update(rpd=None).where(ApiKey.rpd == 0).execute()


def _v4_key_policy(migrator: SchemaMigrator) -> list:
    """v4: per-key policy: allowed models, expiry, a spending budget per calendar period, parallel requests.

    Every new column is NULL (no restriction) or 0 on existing keys, so no key can do less than before. Plain
    ALTER TABLEs, as in v3 (playhouse would rebuild api_key on SQLite and cascade away its ledger).
    """
    database = migrator.database
    timestamp = "TIMESTAMP" if isinstance(database, PostgresqlDatabase) else "DATETIME"
    columns = ("models VARCHAR(1000)", f"expires_at {timestamp}", "budget BIGINT", "budget_period VARCHAR(5)",
               "budget_spent BIGINT NOT NULL DEFAULT 0", f"budget_period_start {timestamp}",
               "max_parallel INTEGER")
    return [lambda column=column: database.execute_sql(f"ALTER TABLE api_key ADD COLUMN {column}")
            for column in columns]


def _v5_admin_keys_audit_console(migrator: SchemaMigrator) -> list:
    """v5: admin keys (the admin API only), the audit log of changes made through the admin API and the
    console, and the console's users."""
    database = migrator.database
    database.create_tables([AuditEntry, ConsoleUser], safe=True)
    false = "FALSE" if isinstance(database, PostgresqlDatabase) else "0"
    # A plain ALTER TABLE, as in v3: playhouse would rebuild api_key on SQLite and cascade away its ledger.
    return [lambda: database.execute_sql(f"ALTER TABLE api_key ADD COLUMN admin BOOLEAN NOT NULL DEFAULT {false}")]


def _v6_usage_answered_by(migrator: SchemaMigrator) -> list:
    """v6: a ledger row says which model and provider answered (routes, key pools, fallback models) and
    how many upstream calls the request took.

    Plain ALTER TABLE ... NOT NULL DEFAULT, as in v3: playhouse's add_column rebuilds the table on SQLite.
    """
    database = migrator.database
    usage = database.quote[0] + "usage" + database.quote[1]          # USAGE is a keyword in MySQL
    columns = ("answered_model VARCHAR(200) NOT NULL DEFAULT ''", "provider VARCHAR(100) NOT NULL DEFAULT ''",
               "attempts SMALLINT NOT NULL DEFAULT 0")
    return [lambda c=c: database.execute_sql(f"ALTER TABLE {usage} ADD COLUMN {c}") for c in columns]


def _v7_usage_day_roll_up(migrator: SchemaMigrator) -> list:
    """v7: the daily roll-up of the ledger (``usage_day``), filled from the settled rows so far, and an index
    for the failed requests of a period; the usage report and the console read whole days from the roll-up
    (docs/benchmarks.md, "The ledger at scale"). Plain CREATE TABLE / CREATE INDEX / INSERT ... SELECT: nothing
    is rebuilt."""
    database = migrator.database
    database.create_tables([UsageDay], safe=True)
    return [lambda: database.execute_sql(
                'CREATE INDEX {0}usage_outcome_created_at{1} ON {0}usage{1} ({0}outcome{1}, {0}created_at{1})'
                .format(*database.quote)),
            lambda: fill_usage_day(database)]


def fill_usage_day(database: Database = db) -> None:
    """Sum the settled ledger into an empty ``usage_day`` (the v7 upgrade, and bench/seed_ledger.py)."""
    o, c = database.quote[0], database.quote[1]
    columns = ("key_id", "day", "model", "requests", "prompt_tokens", "completion_tokens", "charge", "estimated")
    database.execute_sql(
        f"INSERT INTO {o}usage_day{c} ({', '.join(o + col + c for col in columns)}) "
        f"SELECT {o}key_id{c}, DATE({o}created_at{c}), {o}model{c}, COUNT(*), SUM({o}prompt_tokens{c}), "
        f"SUM({o}completion_tokens{c}), SUM({o}charge{c}), SUM(CASE WHEN {o}estimated{c} THEN 1 ELSE 0 END) "
        f"FROM {o}usage{c} WHERE {o}state{c} = 'settled' "
        f"GROUP BY {o}key_id{c}, DATE({o}created_at{c}), {o}model{c}")


#: version reached -> step that takes the schema from version-1 to it.
STEPS: dict[int, Callable[[SchemaMigrator], list]] = {2: _v2_owner_and_heartbeat, 3: _v3_disabled_unlimited_refusals,
                                                      4: _v4_key_policy,
                                                      5: _v5_admin_keys_audit_console,
                                                      6: _v6_usage_answered_by,
                                                      7: _v7_usage_day_roll_up}


def current_version(database: Database = db) -> int | None:
    """The stored schema version, 0 for tables without a version row, None for an empty database."""
    tables = set(database.get_tables())
    if not tables:
        return None
    if SchemaInfo._meta.table_name not in tables:
        return 0
    row = SchemaInfo.get_or_none(SchemaInfo.id == 1)
    return row.version if row else 0


def create(database: Database = db) -> None:
    """Create every table at the current version (idempotent; safe when several processes race)."""
    with database.atomic():
        database.create_tables(MODELS, safe=True)
        (SchemaInfo.insert(id=1, version=SCHEMA_VERSION)
         .on_conflict_ignore()
         .execute())


def ensure(database: Database = db) -> None:
    """Create an empty database, accept the current schema, refuse any other.

    :raise ConfigurationError: naming the command that fixes it.
    """
    version = current_version(database)
    if version is None:
        try:
            create(database)
        except PeeweeException:          # another process created it at the same moment (PostgreSQL, MySQL)
            if current_version(database) != SCHEMA_VERSION:
                raise
    elif version < SCHEMA_VERSION:
        raise ConfigurationError(
            f"the database schema is at version {version}, this Boundless needs {SCHEMA_VERSION}: "
            f"run `boundless db upgrade` (back the database up first: `boundless db backup PATH` for SQLite)")
    elif version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the database schema is at version {version}, newer than this Boundless knows ({SCHEMA_VERSION}): "
            f"upgrade Boundless")


def upgrade(database: Database = db) -> list[int]:
    """Bring the schema to :data:`SCHEMA_VERSION`; return the versions applied (empty when already there)."""
    version = current_version(database)
    if version is None:
        create(database)
        return [SCHEMA_VERSION]
    if version > SCHEMA_VERSION:
        raise ConfigurationError(f"the database schema is at version {version}, newer than this Boundless")
    if version == 0:
        raise ConfigurationError("the database has tables but no Boundless schema version: not a Boundless "
                                 "database, or one damaged by hand; refusing to touch it")
    migrator = SchemaMigrator.from_database(database)
    applied = []
    for target in range(version + 1, SCHEMA_VERSION + 1):
        with database.atomic():
            for operation in STEPS[target](migrator):      # playhouse operations, or plain functions (data)
                operation.run() if hasattr(operation, "run") else operation()
            if not SchemaInfo.update(version=target).where(SchemaInfo.id == 1).execute():
                SchemaInfo.create(id=1, version=target)
        applied.append(target)
    return applied
