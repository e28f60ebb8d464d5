"""
app.settings
~~~~~~~~~~~~

Every setting of the gateway, with its default, read once from the environment at start-up.

Names are the environment variables themselves (``BOUNDLESS_*``) and become Flask config keys of the same
name. ``create_app(test_config)`` may override any of them. Nothing reads the environment per request.
"""
from __future__ import annotations

import os
from pathlib import Path

#: The repository (or install) root: the folder holding ``app/``, ``config/`` and ``gunicorn.conf.py``.
ROOT = Path(__file__).resolve().parent.parent

#: Where the default SQLite files live.
INSTANCE_DIR = Path(os.environ.get("BOUNDLESS_INSTANCE_DIR", ROOT / "instance"))

DEFAULTS: dict[str, object] = {
    #: Path of the TOML catalogue of providers, models, prices and default limits.
    "BOUNDLESS_CONFIG": str(ROOT / "config" / "boundless.toml"),
    #: peewee db_url of the keys/credit/ledger database.
    "BOUNDLESS_DATABASE_URL": f"sqlite:///{INSTANCE_DIR / 'boundless.db'}",
    #: limits storage URI for the rate-limit counters ("" = an SQLite file beside the database).
    "BOUNDLESS_RATELIMIT_STORAGE": "",
    #: Largest accepted request body, in bytes (413 above it).
    "BOUNDLESS_MAX_BODY_BYTES": 10 * 1024 * 1024,
    #: Seconds a caller has to send a whole request body (408 after; a slow body cannot hold a connection slot).
    "BOUNDLESS_BODY_TIMEOUT": 30.0,
    #: Seconds to connect to a provider.
    "BOUNDLESS_UPSTREAM_CONNECT_TIMEOUT": 5.0,
    #: Longest silence between two bytes from a provider, in seconds (not a limit on a whole stream).
    "BOUNDLESS_UPSTREAM_READ_TIMEOUT": 300.0,
    #: Largest upstream answer read into memory (a JSON answer or an error, decoded), in bytes (502 above it).
    "BOUNDLESS_UPSTREAM_MAX_BODY_BYTES": 64 * 1024 * 1024,
    #: Seconds a looked-up key stays cached in a worker (revocations and limit changes show within this).
    "BOUNDLESS_KEY_CACHE_SECONDS": 1.0,
    #: Peers trusted to say who the caller is in X-Forwarded-For (a local nginx); also read by gunicorn.conf.py.
    "BOUNDLESS_FORWARDED_ALLOW_IPS": "127.0.0.1",
    #: Number of gunicorn workers; read by the memory:// guard (the gunicorn config sets it from the same name).
    "BOUNDLESS_WORKERS": 0,
    #: Bearer token that GET /metrics requires ("" = no token; then keep /metrics off the public network).
    "BOUNDLESS_METRICS_TOKEN": "",
    #: Directory of the multiprocess metric files, emptied at start by gunicorn.conf.py ("" = a fresh temp dir).
    "BOUNDLESS_METRICS_DIR": "",
    #: Write one JSON access line per request to stderr (logger "boundless.access").
    "BOUNDLESS_LOG_REQUESTS": True,
    #: Serve the web console at /console/ (false: it answers 404).
    "BOUNDLESS_CONSOLE": True,
    #: Signs the console's session cookies; the same on every worker and gateway ("" = one generated once into
    #: a file beside the SQLite database, or under instance/ for a server database).
    "BOUNDLESS_SECRET_KEY": "",
}


def from_env(environ: os._Environ | dict | None = None) -> dict[str, object]:
    """Return DEFAULTS overlaid with the ``BOUNDLESS_*`` environment variables, typed like the defaults."""
    environ = os.environ if environ is None else environ
    out: dict[str, object] = {}
    for name, default in DEFAULTS.items():
        raw = environ.get(name)
        if raw is None or raw == "":
            out[name] = default
        elif isinstance(default, bool):
            out[name] = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[name] = int(raw)
        elif isinstance(default, float):
            out[name] = float(raw)
        else:
            out[name] = raw
    return out


def default_ratelimit_storage(database_url: str) -> str:
    """An SQLite counter file beside the SQLite database, or under instance/ for a server database."""
    if database_url.startswith("sqlite:///") and database_url not in ("sqlite:///:memory:",):
        db_path = Path(database_url[len("sqlite:///"):]).resolve()
        return f"sqlite:///{db_path.with_name(db_path.stem + '-ratelimit.db')}"
    return f"sqlite:///{INSTANCE_DIR / 'ratelimit.db'}"
