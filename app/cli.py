"""
app.cli
~~~~~~~

The ``boundless`` command: serve, keys, usage, db. It works while the server runs, on the same database.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from decimal import Decimal

import click
from peewee import Case
from peewee import fn

from . import keys as keyadmin
from .store import schema
from .catalog import Catalog
from .catalog import load as load_catalog
from .accounting.credits import to_credits
from .server.lifecycle import settle_owner
from .server.lifecycle import settle_silent
from .errors import ConfigurationError
from .store.models import ApiKey
from .store.models import Usage
from .store.models import db
from .store.models import backup_sqlite
from .store.models import make_database
from .settings import ROOT
from .settings import from_env


def _open_db(ensure: bool = True) -> dict:
    cfg = from_env()
    url = cfg["BOUNDLESS_DATABASE_URL"]
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    db.initialize(make_database(url))
    if ensure:
        with db.connection_context():
            schema.ensure()
    return cfg


def _catalog(cfg: dict) -> Catalog | None:
    try:
        return load_catalog(cfg["BOUNDLESS_CONFIG"])
    except ConfigurationError:
        return None


class _Group(click.Group):
    """Turn ConfigurationError into a one-line message and exit status 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigurationError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=_Group)
def main() -> None:
    """Boundless, an OpenAI-compatible LLM API gateway."""


# --------------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------------

@main.command()
@click.option("--bind", "-b", default=None, help="HOST:PORT to listen on (default from gunicorn.conf.py).")
@click.option("--workers", "-w", type=int, default=None, help="Number of worker processes.")
def serve(bind: str | None, workers: int | None) -> None:
    """Start the gateway under gunicorn with the shipped gunicorn.conf.py."""
    cfg = _open_db()            # creates an empty database once, before any worker starts
    load_catalog(cfg["BOUNDLESS_CONFIG"])  # refuse to start on a bad catalogue, with its line
    db.close()
    argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "--chdir", str(ROOT)]
    if bind:
        argv += ["--bind", bind]
    if workers:
        argv += ["--workers", str(workers)]
    argv.append("wsgi:app")
    os.execv(sys.executable, argv)


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """Create, list, update, top up and revoke API keys."""


@keys.command("create")
@click.option("--name", required=True, help="A unique name for the key.")
@click.option("--rpm", type=click.IntRange(min=0), default=None, help="Requests per minute (default: catalogue).")
@click.option("--rpd", type=click.IntRange(min=0), default=None, help="Requests per day (default: catalogue).")
@click.option("--credit", type=str, default=None, help="Opening balance in credits for paid models.")
def keys_create(name: str, rpm: int | None, rpd: int | None, credit: str | None) -> None:
    """Create a key and print it (shown this once only)."""
    _open_db()
    key = keyadmin.create(name, rpm=rpm, rpd=rpd, credit=credit)
    click.echo(key)
    click.echo(f"created key {name!r}; store it now, it cannot be shown again", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_list(as_json: bool) -> None:
    """Show every key: name, prefix, limits, balance, spent, state."""
    cfg = _open_db()
    cat = _catalog(cfg)
    d_rpm, d_rpd = (cat.limits.rpm, cat.limits.rpd) if cat else (None, None)
    rows = []
    for k in keyadmin.all_keys():
        rows.append({"name": k.name, "prefix": k.prefix + "...", "rpm": k.rpm if k.rpm is not None else d_rpm,
                     "rpd": k.rpd if k.rpd is not None else d_rpd, "balance": str(to_credits(k.balance)),
                     "spent": str(to_credits(k.spent)), "state": "revoked" if k.revoked else "active"})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _table(["NAME", "PREFIX", "RPM", "RPD", "BALANCE", "SPENT", "STATE"],
           [[r["name"], r["prefix"], r["rpm"], r["rpd"], r["balance"], r["spent"], r["state"]] for r in rows])


@keys.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Revoke a key: its next request gets 401 (within BOUNDLESS_KEY_CACHE_SECONDS)."""
    _open_db()
    keyadmin.revoke(name)
    click.echo(f"revoked key {name!r}")


@keys.command("update")
@click.argument("name")
@click.option("--rpm", type=click.IntRange(min=0), default=None, help="New requests per minute.")
@click.option("--rpd", type=click.IntRange(min=0), default=None, help="New requests per day.")
@click.option("--credit", type=str, default=None, help="Set the balance to exactly this many credits.")
def keys_update(name: str, rpm: int | None, rpd: int | None, credit: str | None) -> None:
    """Change a key's limits or set its balance, without a restart."""
    _open_db()
    changes = {}
    if rpm is not None:
        changes["rpm"] = rpm
    if rpd is not None:
        changes["rpd"] = rpd
    if not changes and credit is None:
        raise click.UsageError("nothing to change: give --rpm, --rpd or --credit")
    keyadmin.update(name, credit=credit, **changes)
    click.echo(f"updated key {name!r}")


@keys.command("topup")
@click.argument("name")
@click.argument("amount")
def keys_topup(name: str, amount: str) -> None:
    """Add AMOUNT credits to a key's balance."""
    _open_db()
    balance = keyadmin.topup(name, amount)
    click.echo(f"topped up key {name!r}: balance {to_credits(balance)}")


# --------------------------------------------------------------------------------------------------
# usage
# --------------------------------------------------------------------------------------------------

def _date(value: str | None, end: bool = False) -> datetime.datetime | None:
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = datetime.date.fromisoformat(value)
            return datetime.datetime.combine(day + datetime.timedelta(days=1 if end else 0), datetime.time())
        moment = datetime.datetime.fromisoformat(value)
        if moment.tzinfo is not None:                  # the ledger is in UTC: convert, do not just drop the offset
            moment = moment.astimezone(datetime.timezone.utc)
        return moment.replace(tzinfo=None)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD) or an ISO date-time") from None


@main.command()
@click.option("--key", "key_name", default=None, help="Only this key.")
@click.option("--model", default=None, help="Only this model.")
@click.option("--since", default=None, help="From this date (YYYY-MM-DD, UTC) or ISO date-time.")
@click.option("--until", default=None, help="Up to and including this date, or before this ISO date-time.")
@click.option("--by", type=click.Choice(["day", "model", "key"]), default="day", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def usage(key_name, model, since, until, by, as_json) -> None:
    """Requests, tokens and credits from the ledger."""
    _open_db()
    # DATE() uncoerced: peewee would read SQLite's 'YYYY-MM-DD' back through DateTimeField as a midnight datetime
    group = {"day": fn.DATE(Usage.created_at).coerce(False), "model": Usage.model, "key": ApiKey.name}[by]
    query = (Usage.select(group.alias("grp"), fn.COUNT(Usage.id), fn.SUM(Usage.prompt_tokens),
                          fn.SUM(Usage.completion_tokens), fn.SUM(Usage.charge),
                          fn.SUM(Case(None, [(Usage.estimated == True, 1)], 0)))   # noqa: E712
             .join(ApiKey)
             .where(Usage.state == "settled"))
    if key_name:
        query = query.where(ApiKey.name == key_name)
    if model:
        query = query.where(Usage.model == model)
    if since:
        query = query.where(Usage.created_at >= _date(since))
    if until:
        query = query.where(Usage.created_at < _date(until, end=True))
    rows = [[str(g), int(n), int(p or 0), int(c or 0), to_credits(int(ch or 0)), int(e or 0)]
            for g, n, p, c, ch, e in query.group_by(group).order_by(group).tuples()]
    if as_json:
        click.echo(json.dumps([{by: r[0], "requests": r[1], "prompt_tokens": r[2], "completion_tokens": r[3],
                                "credits": float(r[4]), "estimated": r[5]} for r in rows], indent=2))
        return
    total = ["TOTAL", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows),
             sum((r[4] for r in rows), Decimal(0)), sum(r[5] for r in rows)]
    _table([by.upper(), "REQUESTS", "PROMPT", "COMPLETION", "CREDITS", "ESTIMATED"], rows + [total])


# --------------------------------------------------------------------------------------------------
# db
# --------------------------------------------------------------------------------------------------

@main.group("db")
def db_group() -> None:
    """Database schema and backups."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Bring the database schema to this version of Boundless (keeps every row)."""
    _open_db(ensure=False)
    with db.connection_context():
        applied = schema.upgrade()
    click.echo(f"upgraded to schema version(s) {applied}" if applied else "schema already current")


@db_group.command("backup")
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
def db_backup(path: str) -> None:
    """Copy the SQLite database to PATH, consistently, while the server runs (SQLite's online backup API).

    For PostgreSQL use pg_dump, for MySQL/MariaDB mysqldump --single-transaction (see docs/deploying.md).
    """
    cfg = _open_db()
    url = str(cfg["BOUNDLESS_DATABASE_URL"])
    if not url.startswith("sqlite"):
        raise click.ClickException("`boundless db backup` copies SQLite databases; for PostgreSQL use pg_dump, "
                                   "for MySQL/MariaDB mysqldump --single-transaction (docs/deploying.md)")
    target = os.path.abspath(path)
    if os.path.exists(target):
        raise click.ClickException(f"{target} exists; refusing to overwrite it")
    with db.connection_context():
        pages = backup_sqlite(db.connection(), target)
    click.echo(f"backed up {pages} pages to {target}")


@db_group.command("recover")
@click.option("--owner", default=None, help="Only the rows of this worker (INSTANCE:PID), known to be dead.")
@click.option("--silent", type=float, default=None, help="Settle workers silent this many seconds (default 90).")
def db_recover(owner: str | None, silent: float | None) -> None:
    """Settle requests left held by dead workers (gunicorn.conf.py runs it when a worker exits)."""
    _open_db()
    with db.connection_context():
        n = settle_owner(owner) if owner else settle_silent(**({"silent": silent} if silent is not None else {}))
    click.echo(f"settled {n} request(s) left by dead workers")


def _table(header: list, rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
