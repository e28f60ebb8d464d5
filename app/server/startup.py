"""
app.server.startup
~~~~~~~~~~~~~~~~~~

The start-up summary: what this gateway loaded, printed once per start (by the first worker, from
``post_worker_init`` in gunicorn.conf.py) so that an operator sees at a glance which catalogue, database and
counters it runs on, and which providers have no key. Never a password nor a key: URLs are redacted and a
provider key is only said to be set or not.
"""
from __future__ import annotations

import os
import sys

from flask import Flask

from ..settings import default_ratelimit_storage
from ..text import plural
from ..text import redact


def summary(app: Flask, workers: int, worker_class: str) -> list[str]:
    """The lines of the summary for ``app`` served by ``workers`` workers of ``worker_class``."""
    state = app.extensions["boundless"]
    cat = state.catalog
    storage = app.config["BOUNDLESS_RATELIMIT_STORAGE"]
    lines = [
        f"catalogue {cat.path}: {plural(len(cat.models), 'model')}, {plural(len(cat.providers), 'provider')}",
        f"database {redact(str(app.config['BOUNDLESS_DATABASE_URL']))}",
        f"rate-limit storage {redact(storage)}" if storage else
        f"rate-limit storage {default_ratelimit_storage(str(app.config['BOUNDLESS_DATABASE_URL']))} (the default)",
        f"{plural(workers, worker_class + ' worker')}",
    ]
    for provider in cat.providers.values():
        unset = [env for env in provider.api_key_envs if not os.environ.get(env)]
        if not unset:
            continue
        models = [m.id for m in cat.models.values() if any(r.provider is provider for r in m.routes)]
        if len(unset) == len(provider.api_key_envs):
            lines.append(f"warning: provider {provider.name!r} has no key: {', '.join(unset)} "
                         f"{'is' if len(unset) == 1 else 'are'} not set, so calls to its "
                         f"{plural(len(models), 'model')} will fail")
        else:
            lines.append(f"warning: provider {provider.name!r}: {', '.join(unset)} "
                         f"{'is' if len(unset) == 1 else 'are'} not set, so its pool has "
                         f"{len(provider.api_key_envs) - len(unset)} of {len(provider.api_key_envs)} keys")
    return lines


def print_summary(worker) -> None:
    """Print the summary to stderr for a gunicorn worker (its app, its settings)."""
    for line in summary(worker.wsgi, worker.cfg.workers, worker.cfg.worker_class_str):
        print(f"boundless: {line}", file=sys.stderr, flush=True)
