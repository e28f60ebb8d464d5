"""
app.server.health
~~~~~~~~~~~~~~~~~

Probes for load balancers and orchestrators; no key needed.

* ``GET /healthz`` (liveness): the process answers. No I/O, always ``200 {"status": "ok"}``.
* ``GET /readyz`` (readiness): the dependencies a chat request needs are reachable: the database (``SELECT 1``
  through the pool), the rate-limit storage (``limiter.check()``) and the catalogue (loaded, with models).
  200 ``{"status": "ready", "checks": {...}}``, or 503 with an OpenAI-shaped error naming what failed plus the
  same ``checks``. Details of a failure go to the log, never to the body (no URLs, hosts or passwords).
"""
from __future__ import annotations

import logging

from flask import Flask
from flask import Response
from flask import jsonify

from ..errors import ServiceUnavailable
from ..store.models import db
from ..state import state

log = logging.getLogger("boundless")

NO_STORE = {"Cache-Control": "no-store"}


def healthz() -> Response:
    return jsonify({"status": "ok"}), 200, NO_STORE


def _database() -> bool:
    try:
        with db.connection_context():
            db.execute_sql("SELECT 1").fetchone()
        return True
    except Exception as err:
        log.warning("readiness: database check failed: %s: %s", type(err).__name__, str(err).strip()[:300])
        return False


def _ratelimit_storage() -> bool:
    ok = state().limiter.check()
    if not ok:
        log.warning("readiness: rate-limit storage check failed")
    return ok


def _catalogue() -> bool:
    cat = state().catalog
    return cat is not None and bool(cat.models)


CHECKS = (("database", _database), ("ratelimit_storage", _ratelimit_storage), ("catalogue", _catalogue))


def readyz() -> Response:
    checks = {}
    for name, check in CHECKS:
        try:
            checks[name] = "ok" if check() else "failed"
        except Exception:
            log.exception("readiness: %s check raised", name)
            checks[name] = "failed"
    failed = [name for name, result in checks.items() if result != "ok"]
    if not failed:
        return jsonify({"status": "ready", "checks": checks}), 200, NO_STORE
    body = ServiceUnavailable(f"not ready: {', '.join(failed)}", code="not_ready").to_dict()
    body["checks"] = checks
    return jsonify(body), 503, NO_STORE


def init_app(app: Flask) -> None:
    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
