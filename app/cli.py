"""
app.cli
~~~~~~~

The ``boundless`` command: serve, keys, usage, db. It works while the server runs, on the same database.

Every failure is one line on stderr, ``Error: ...``, and exit status 1: a user's mistake (a bad argument, an
unknown name, an unreachable database, a path that does not exist) never shows a traceback.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sqlite3
import sys
import zoneinfo
from decimal import Decimal
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import click
from peewee import PeeweeException

from . import audit
from . import console_users
from . import keyops
from . import keys as keyadmin
from . import policy
from .accounting import budget as budgets
from .store import schema
from .catalog import Catalog
from .catalog import load as load_catalog
from .accounting import reports
from .accounting.credits import amount
from .accounting.credits import to_credits
from .server.lifecycle import settle_owner
from .server.lifecycle import settle_silent
from .errors import ConfigurationError
from .store.models import ApiKey
from .store.models import db
from .store.models import backup_sqlite
from .store.models import make_database
from .settings import ROOT
from .upstream import probe
from .upstream.client import UpstreamClient
from .settings import from_env
from .text import plural
from .text import redact


def _settings() -> dict:
    try:
        return from_env()
    except ValueError as err:          # e.g. BOUNDLESS_MAX_BODY_BYTES=lots
        raise ConfigurationError(f"a BOUNDLESS_* setting is not valid: {err}") from err


def _open_db(ensure: bool = True) -> dict:
    cfg = _settings()
    url = str(cfg["BOUNDLESS_DATABASE_URL"])
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as err:
                raise ConfigurationError(f"BOUNDLESS_DATABASE_URL={url}: cannot create the folder of the "
                                         f"database: {err.strerror}") from err
    try:
        db.initialize(make_database(url))
    except (ValueError, RuntimeError, ImportError) as err:     # bad scheme, no driver installed
        raise ConfigurationError(f"BOUNDLESS_DATABASE_URL={redact(url)} is not usable: {err} (expected "
                                 f"sqlite:///PATH, postgresql://... or mysql://...)") from err
    if ensure:
        with db.connection_context():
            schema.ensure()
    return cfg


def _catalog(cfg: dict) -> Catalog | None:
    try:
        return load_catalog(cfg["BOUNDLESS_CONFIG"])
    except ConfigurationError:
        return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Root(click.Group):
    """The ``boundless`` group: every failure one line on stderr and exit 1; ``--help`` lists every command."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            code = super().main(args, prog_name or "boundless", standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:     # bare `boundless` or `boundless keys`: the help
            click.echo(err.ctx.get_help())
            code = 0
        except click.UsageError as err:
            hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            code = _fail(err.format_message() + hint)
        except click.ClickException as err:
            code = _fail(err.format_message())
        except click.Abort:
            code = _fail("aborted")
        except ConfigurationError as err:
            code = _fail(str(err))
        except PeeweeException as err:          # unreachable or broken database
            url = redact(str(_settings().get("BOUNDLESS_DATABASE_URL", "")))
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            code = _fail(f"the database {url} failed: {first}")
        except (OSError, sqlite3.Error) as err:
            code = _fail(str(err))
        sys.exit(code if isinstance(code, int) else 0)

    def format_commands(self, ctx, formatter) -> None:
        """Every command, sub-commands included (``keys create`` ...), one line each."""
        rows = []

        def walk(group: click.Group, prefix: str) -> None:
            for name in group.list_commands(ctx):
                cmd = group.get_command(ctx, name)
                if cmd is None or cmd.hidden:
                    continue
                if isinstance(cmd, click.Group):
                    walk(cmd, f"{prefix}{name} ")
                else:
                    rows.append((prefix + name, cmd.get_short_help_str(limit=60)))

        walk(self, "")
        with formatter.section("Commands"):
            formatter.write_dl(rows, col_spacing=2)


def _fail(message: str) -> int:
    click.echo(f"Error: {_one_line(message)}", err=True)
    return 1


def _version() -> str:
    try:
        return package_version("boundless")
    except PackageNotFoundError:
        return "unknown (not installed)"


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", "-V", prog_name="boundless", message="%(prog)s %(version)s")
def main() -> None:
    """Boundless, an OpenAI-compatible LLM API gateway.

    Settings come from BOUNDLESS_* environment variables (README, "Configuration"); the keys, credit and
    ledger live in BOUNDLESS_DATABASE_URL (default: instance/boundless.db in the install folder).
    """


# --------------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------------

def check_bind(value: str) -> str:
    """Check a gunicorn bind address now, so that a mistake is named at once instead of after gunicorn's
    retries: ``HOST:PORT`` (``[::1]:8000`` for IPv6) or ``unix:PATH``.

    :raise ConfigurationError: saying what is wrong with it.
    """
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if not path or not os.path.isdir(folder):
            raise ConfigurationError(f"--bind {value!r}: the folder of the socket, {folder or '(none)'}, "
                                     f"does not exist")
        return value
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host:
        raise ConfigurationError(f"--bind {value!r} is not HOST:PORT (e.g. 127.0.0.1:8000) or unix:PATH")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigurationError(f"--bind {value!r}: the port must be a number from 1 to 65535, not {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigurationError(f"--bind {value!r}: the host {host!r} is not a known name or address "
                                 f"({getattr(err, 'strerror', None) or err})") from err
    with socket.socket(family, kind, proto) as probe:      # the address free and ours, as gunicorn will need
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            why = {errno.EADDRINUSE: "is already in use (another `boundless serve`? stop it, or choose another "
                                     "port with --bind)",
                   errno.EADDRNOTAVAIL: f"is not an address of this machine ({host!r})",
                   errno.EACCES: "needs more privileges (ports below 1024)"}.get(err.errno, f": {err.strerror}")
            raise ConfigurationError(f"--bind {value!r} {why}") from err
    return value


@main.command()
@click.option("--bind", "-b", default=None, help="HOST:PORT or unix:PATH to listen on (default 127.0.0.1:8000, "
                                                 "or BOUNDLESS_BIND).")
@click.option("--workers", "-w", type=click.IntRange(min=1), default=None, help="Number of worker processes "
                                                                                "(default 2, or BOUNDLESS_WORKERS).")
def serve(bind: str | None, workers: int | None) -> None:
    """Start the gateway (gunicorn with gunicorn.conf.py)."""
    check_bind(bind or os.environ.get("BOUNDLESS_BIND") or "127.0.0.1:8000")
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
    """Create, list, update, top up, disable, enable and revoke API keys."""


def _policy_options(update: bool):
    """The per-key policy options of `keys create` and `keys update` (README, "Per-key policy")."""
    lift = {"models": ' (or "*": every model)', "expires": " or never", "budget": " or none", "parallel": " or none"}
    if not update:
        lift = {k: "" for k in lift}
    options = [
        click.option("--models", default=None, metavar="PATTERNS",
                     help=f"Comma-separated catalogue ids the key may call, * wildcards allowed "
                          f'("deepseek-*,gpt-4o-mini"){lift["models"]}; default: every model.'),
        click.option("--expires", default=None, metavar="WHEN",
                     help=f"When the key stops working: an ISO date or date-time (in [limits] day_timezone unless "
                          f"it has an offset), or a duration like 30d, 12h{lift['expires']}."),
        click.option("--budget", default=None, metavar="AMOUNT",
                     help=f"A spending cap in credits per --budget-period{lift['budget']}."),
        click.option("--budget-period", default=None, type=click.Choice(budgets.PERIODS),
                     help="The budget's calendar period, in [limits] day_timezone."),
        click.option("--max-parallel", default=None, metavar="N",
                     help=f"At most N requests of the key in flight at once{lift['parallel']}."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _tz(cfg: dict, strict: bool = True) -> datetime.tzinfo:
    """``[limits] day_timezone`` from the catalogue (budgets' periods, dates without an offset); UTC, when not
    ``strict`` and the catalogue cannot be read."""
    try:
        return zoneinfo.ZoneInfo(load_catalog(cfg["BOUNDLESS_CONFIG"]).limits.day_timezone)
    except ConfigurationError as err:
        if not strict:
            return datetime.timezone.utc
        raise ConfigurationError(f"--expires and --budget need [limits] day_timezone from the catalogue, which "
                                 f"cannot be read: {err}") from err


def _policy(cfg: dict, models: str | None, expires: str | None, budget: str | None, budget_period: str | None,
            max_parallel: str | None, update: bool) -> dict:
    """The policy options as keys.create/update take them (only those given)."""
    out: dict = {}
    if models is not None:
        out["models"] = policy.parse_models(models)
        cat = _catalog(cfg)
        missing = policy.unmatched(out["models"], cat.models) if cat else []
        if missing:
            click.echo(f"warning: --models {', '.join(missing)} matches no model of the catalogue now", err=True)
    if expires is not None:
        if not update and expires.strip().lower() == "never":
            raise ConfigurationError("--expires never is for `keys update`; a new key without --expires never "
                                     "expires")
        out["expires_at"] = policy.parse_expiry(expires, _tz(cfg), datetime.datetime.now(datetime.timezone.utc))
    if budget is not None:
        out["budget"] = budgets.parse_budget(budget, allow_none=update)
    if budget_period is not None:
        out["budget_period"] = budget_period
    if max_parallel is not None:
        out["max_parallel"] = policy.parse_max_parallel(max_parallel, allow_none=update)
    return out


@keys.command("create")
@click.option("--name", required=True, help="A unique name for the key.")
@click.option("--rpm", default=None, metavar="N|none",
              help="Requests per minute: a positive number, or none for no limit (default: the catalogue's).")
@click.option("--rpd", default=None, metavar="N|none",
              help="Requests per day: a positive number, or none for no limit (default: the catalogue's).")
@click.option("--credit", type=str, default=None, help="Opening balance in credits for paid models.")
@_policy_options(update=False)
@click.option("--admin", is_flag=True, help="A key for the admin API (/api/v1/keys ...) only; it cannot chat.")
def keys_create(name: str, rpm: str | None, rpd: str | None, credit: str | None, models: str | None,
                expires: str | None, budget: str | None, budget_period: str | None, max_parallel: str | None,
                admin: bool) -> None:
    """Create a key and print it (shown this once only)."""
    limits = {opt: keyadmin.parse_limit(text, opt) for opt, text in (("rpm", rpm), ("rpd", rpd)) if text is not None}
    if admin and (limits or credit is not None or models is not None or budget is not None
                  or max_parallel is not None):
        raise click.UsageError("an --admin key calls the admin API only: it has no limits, credit, models, budget "
                               "or parallel cap (--expires is fine)")
    if (budget is None) != (budget_period is None):
        raise click.UsageError("--budget and --budget-period go together (e.g. --budget 10 --budget-period month)")
    cfg = _open_db()
    key = keyadmin.create(name, credit=credit, admin=admin, **limits,
                          **_policy(cfg, models, expires, budget, budget_period, max_parallel, update=False))
    click.echo(key)
    click.echo(f"created key {name!r} in {redact(str(cfg['BOUNDLESS_DATABASE_URL']))}; store the key now, it "
               f"cannot be shown again", err=True)


def _shown_limit(stored: int | None, default: int | None) -> int | str | None:
    """A key's limit as listed: a number, "none" (no limit), or "default" when the catalogue is unreadable."""
    if stored is None and default is None:
        return "default"
    limit = keyadmin.effective_limit(stored, default)
    return "none" if limit is None else limit


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_list(as_json: bool) -> None:
    """Show every key: prefix, limits, balance, spent, state."""
    cfg = _open_db()
    cat = _catalog(cfg)
    d_rpm, d_rpd = (cat.limits.rpm, cat.limits.rpd) if cat else (None, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    # the catalogue's day zone (budgets' periods), UTC when it cannot be read (as _tz(strict=False))
    periods = budgets.periods(now, zoneinfo.ZoneInfo(cat.limits.day_timezone) if cat else datetime.timezone.utc)
    rows = []
    for k in keyadmin.all_keys():
        rows.append({"name": k.name, "prefix": k.prefix + "...", "rpm": _shown_limit(k.rpm, d_rpm),
                     "rpd": _shown_limit(k.rpd, d_rpd), "balance": amount(k.balance),
                     "spent": amount(k.spent), "state": keyops.state_of(k), "admin": bool(k.admin),
                     "models": list(policy.patterns(k.models) or ["*"]), "expires_at": policy.iso_utc(k.expires_at),
                     "budget": None if k.budget is None else amount(k.budget),
                     "budget_period": k.budget_period,
                     "budget_spent": None if k.budget is None else amount(budgets.spent_now(k, periods)),
                     "max_parallel": k.max_parallel})
    if as_json:
        for r in rows:            # JSON: null for no limit
            r["rpm"], r["rpd"] = (None if r["rpm"] == "none" else r["rpm"]), (None if r["rpd"] == "none" else r["rpd"])
        click.echo(json.dumps(rows, indent=2))
        return
    _table(["NAME", "PREFIX", "RPM", "RPD", "BALANCE", "SPENT", "STATE", "MODELS", "EXPIRES", "BUDGET", "PARALLEL"],
           [[r["name"], r["prefix"], r["rpm"], r["rpd"], r["balance"], r["spent"],
             r["state"] + (" (admin)" if r["admin"] else ""), ",".join(r["models"]),
             r["expires_at"], _shown_budget(r), r["max_parallel"]] for r in rows])


def _shown_budget(row: dict) -> str | None:
    """``10/month (2.5 spent)``, or None (shown ``-``) without a budget."""
    if row["budget"] is None:
        return None
    return f"{row['budget']}/{row['budget_period']} ({row['budget_spent']} spent)"


@keys.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Revoke a key for good: its next request gets 401.

    Within BOUNDLESS_KEY_CACHE_SECONDS; the name stays taken.
    """
    _open_db()
    keyadmin.revoke(name)
    click.echo(f"revoked key {name!r}")


@keys.command("disable")
@click.argument("name")
def keys_disable(name: str) -> None:
    """Stop a key (401 key_disabled) until `keys enable`.

    Unlike revoke, this is undone by `boundless keys enable NAME`.
    """
    _open_db()
    changed = keyadmin.set_disabled(name, True)
    click.echo(f"disabled key {name!r}" if changed else f"key {name!r} was already disabled")


@keys.command("enable")
@click.argument("name")
def keys_enable(name: str) -> None:
    """Let a disabled key call again."""
    _open_db()
    changed = keyadmin.set_disabled(name, False)
    click.echo(f"enabled key {name!r}" if changed else f"key {name!r} was already enabled")


@keys.command("update")
@click.argument("name")
@click.option("--rpm", default=None, metavar="N|none|default",
              help="New requests per minute: a positive number, none (no limit) or default (the catalogue's).")
@click.option("--rpd", default=None, metavar="N|none|default",
              help="New requests per day: a positive number, none (no limit) or default (the catalogue's).")
@click.option("--credit", type=str, default=None, help="Set the balance to exactly this many credits.")
@_policy_options(update=True)
def keys_update(name: str, rpm: str | None, rpd: str | None, credit: str | None, models: str | None,
                expires: str | None, budget: str | None, budget_period: str | None, max_parallel: str | None) -> None:
    """Change a key's limits, policy or balance (no restart)."""
    changes = {opt: keyadmin.parse_limit(text, opt, default=True)
               for opt, text in (("rpm", rpm), ("rpd", rpd)) if text is not None}
    given = [models, expires, budget, budget_period, max_parallel]
    if not changes and credit is None and all(v is None for v in given):
        raise click.UsageError("nothing to change: give --rpm, --rpd, --credit, --models, --expires, --budget, "
                               "--budget-period or --max-parallel")
    cfg = _open_db()
    changes.update(_policy(cfg, *given, update=True))
    if budget is not None or budget_period is not None:
        changes["tz"] = _tz(cfg)
    keyadmin.update(name, credit=credit, **changes)
    click.echo(f"updated key {name!r}")


# ignore_unknown_options: `topup me -5` is an amount (refused with its reason), not an unknown option "-5"
@keys.command("topup", context_settings={"ignore_unknown_options": True})
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

def _date(value: str | None, end: bool = False, option: str = "--since") -> datetime.datetime | None:
    try:
        return reports.parse_moment(value, end=end)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=option) from None


@main.command()
@click.option("--key", "key_name", default=None, help="Only this key.")
@click.option("--model", default=None, help="Only this model.")
@click.option("--since", default=None, help="From this date (YYYY-MM-DD, UTC) or ISO date-time.")
@click.option("--until", default=None, help="Up to and including this date, or before this ISO date-time.")
@click.option("--by", type=click.Choice(["day", "model", "key"]), default="day", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def usage(key_name, model, since, until, by, as_json) -> None:
    """Requests, tokens, credits and refusals, from the ledger.

    Grouped by day (UTC), model or key; refused requests (402, 429 ...) are counted by reason.
    """
    cfg = _open_db()
    if key_name and not ApiKey.select().where(ApiKey.name == key_name).exists():
        raise ConfigurationError(f"no key named {key_name!r} (see `boundless keys list`)")
    if model and not _known_model(cfg, model):
        raise ConfigurationError(f"no model named {model!r} in the catalogue or the ledger")
    found = reports.usage(by, key_name, model, _date(since), _date(until, end=True, option="--until"))
    rows = [[r.group, r.requests, r.prompt_tokens, r.completion_tokens, to_credits(r.charge), r.estimated, r.refused]
            for r in found]
    if as_json:
        click.echo(json.dumps([r.as_json(by) for r in found], indent=2))
        return
    total = ["TOTAL", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows),
             sum((r[4] for r in rows), Decimal(0)), sum(r[5] for r in rows), sum(sum(r[6].values()) for r in rows)]
    _table([by.upper(), "REQUESTS", "PROMPT", "COMPLETION", "CREDITS", "ESTIMATED", "REFUSED"],
           [r[:6] + [sum(r[6].values())] for r in rows] + [total])
    reasons = [[r[0], reason, n] for r in rows for reason, n in sorted(r[6].items())]
    if reasons:
        click.echo()
        _table([by.upper(), "REFUSED BECAUSE", "REQUESTS"], reasons)


def _known_model(cfg: dict, model: str) -> bool:
    cat = _catalog(cfg)
    return reports.model_known(model, cat.models if cat else ())


# --------------------------------------------------------------------------------------------------
# console users, audit log
# --------------------------------------------------------------------------------------------------

@main.group("console")
def console_group() -> None:
    """Users of the web console (/console/)."""


@console_group.command("add-user")
@click.argument("name")
@click.password_option("--password", prompt="Password", help="Asked for (twice) when not given.")
def console_add_user(name: str, password: str) -> None:
    """Create a console user or set a new password.

    The password is asked for twice; it is stored as a Werkzeug (scrypt) hash.
    """
    _open_db()
    created = console_users.set_password(name, password)
    click.echo(f"{'created' if created else 'changed the password of'} console user {name!r}")


@console_group.command("del-user")
@click.argument("name")
def console_del_user(name: str) -> None:
    """Remove a console user.

    Their open console sessions end at their next page.
    """
    _open_db()
    console_users.remove(name)
    click.echo(f"removed console user {name!r}")


@main.command("audit")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Newest entries shown.")
@click.option("--actor", default=None, help="Only this actor (key:NAME or console:USER).")
@click.option("--target", default=None, help="Only changes to this key.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def audit_log(limit: int, actor: str | None, target: str | None, as_json: bool) -> None:
    """Show the admin API's and console's changes.

    Newest first: when, who (key:NAME or console:USER), what, to which key, the fields changed.
    """
    _open_db()
    entries = [audit.as_dict(e) for e in audit.recent(limit, actor=actor, target=target)]
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    _table(["AT", "ACTOR", "ACTION", "TARGET", "DETAIL"],
           [[e["at"], e["actor"], e["action"], e["target"], json.dumps(e["detail"], sort_keys=True)]
            for e in entries])


# --------------------------------------------------------------------------------------------------
# db
# --------------------------------------------------------------------------------------------------

@main.group("db")
def db_group() -> None:
    """Database schema and backups."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Bring the schema up to date, keeping every row."""
    _open_db(ensure=False)
    with db.connection_context():
        applied = schema.upgrade()
    if applied:
        steps = ", ".join(str(v) for v in applied)
        click.echo(f"upgraded the schema to version {applied[-1]} ({'step' if len(applied) == 1 else 'steps'} "
                   f"{steps})")
    else:
        click.echo("schema already current")


@db_group.command("backup")
@click.argument("path", type=click.Path(dir_okay=False))
def db_backup(path: str) -> None:
    """Copy the SQLite database to PATH while the server runs.

    A consistent copy, with SQLite's online backup API. For PostgreSQL use pg_dump, for MySQL/MariaDB
    mysqldump --single-transaction (see docs/deploying.md).
    """
    cfg = _open_db()
    url = str(cfg["BOUNDLESS_DATABASE_URL"])
    if not url.startswith("sqlite"):
        raise click.ClickException("`boundless db backup` copies SQLite databases; for PostgreSQL use pg_dump, "
                                   "for MySQL/MariaDB mysqldump --single-transaction (docs/deploying.md)")
    target = os.path.abspath(path)
    if os.path.exists(target):
        raise click.ClickException(f"{target} exists; refusing to overwrite it")
    if not os.path.isdir(os.path.dirname(target)):
        raise click.ClickException(f"cannot write {target}: the folder {os.path.dirname(target)} does not exist")
    if not os.access(os.path.dirname(target), os.W_OK):
        raise click.ClickException(f"cannot write {target}: the folder {os.path.dirname(target)} is not writable")
    with db.connection_context():
        pages = backup_sqlite(db.connection(), target)
    click.echo(f"backed up {pages} pages to {target}")


@db_group.command("recover")
@click.option("--owner", default=None, help="Only the rows of this worker (INSTANCE:PID), known to be dead.")
@click.option("--silent", type=float, default=None, help="Settle workers silent this many seconds (default 90).")
def db_recover(owner: str | None, silent: float | None) -> None:
    """Settle requests left held by dead workers.

    gunicorn.conf.py runs it at start and whenever a worker exits. Prints nothing when nothing was held.
    """
    _open_db()
    with db.connection_context():
        n = settle_owner(owner) if owner else settle_silent(**({"silent": silent} if silent is not None else {}))
    if n:                                    # quiet when there is nothing to say (it runs at every start)
        click.echo(f"settled {plural(n, 'request')} left by dead workers")


# --------------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------------

@main.group("providers")
def providers_group() -> None:
    """Check the catalogue's providers."""


@providers_group.command("check")
@click.option("--model", "model_id", default=None, help="Only the providers of this model's routes and fallbacks.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def providers_check(model_id: str | None, as_json: bool) -> None:
    """Call every provider with every key; exit 1 if any fails."""
    cfg = _settings()
    cat = load_catalog(cfg["BOUNDLESS_CONFIG"])
    if model_id is not None and model_id not in cat.models:
        raise click.UsageError(f"no model {model_id!r} in the catalogue {cat.path}")
    client = UpstreamClient(float(cfg["BOUNDLESS_UPSTREAM_CONNECT_TIMEOUT"]),
                            float(cfg["BOUNDLESS_UPSTREAM_READ_TIMEOUT"]),
                            max_body=int(cfg["BOUNDLESS_UPSTREAM_MAX_BODY_BYTES"]))
    results = probe.check_all(client, cat, model_id)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        _table(["PROVIDER", "KEY", "STATUS", "LATENCY", "ERROR"],
               [[r.provider, r.key_env, r.status, None if r.latency_ms is None else f"{r.latency_ms:.0f} ms",
                 r.error] for r in results])
    if not all(r.ok for r in results):
        sys.exit(1)


def _table(header: list, rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
