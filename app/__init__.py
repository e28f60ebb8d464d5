"""
Boundless: a self-hosted, OpenAI-compatible LLM API gateway.

``create_app`` builds the WSGI app: settings → catalogue → database → limits → upstream client → routes.
Every module with app wiring exposes ``init_app(app)``; this factory only calls them.
"""
from __future__ import annotations

import logging

from flask import Flask

from . import catalog
from . import errors
from .server import bodytimeout
from .server import forwarded
from .server import health
from .server import inflight
from .server import logs
from .server import metrics
from .server import refusals
from .store import models
from .store import schema
from .keys import KeyCache
from .limits.ratelimit import RateLimiter
from .settings import default_ratelimit_storage
from .settings import from_env
from .state import State
from .upstream import routing
from .upstream.client import UpstreamClient
from .upstream.cooldowns import Cooldowns


def create_app(test_config: dict | None = None) -> Flask:
    """Create and configure the gateway app.

    :param test_config: settings that override the environment (tests).
    :raise ConfigurationError: for any invalid setting or catalogue; the message says what to fix.
    """
    app = Flask(__name__)
    app.config.update(from_env())
    if test_config:
        app.config.update(test_config)
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["BOUNDLESS_MAX_BODY_BYTES"])
    app.json.sort_keys = False
    logging.getLogger("boundless").setLevel(logging.INFO)

    errors.init_app(app)
    forwarded.init_app(app)
    bodytimeout.init_app(app)
    models.init_app(app)
    with models.db.connection_context():
        schema.ensure()

    cat = catalog.load(app.config["BOUNDLESS_CONFIG"])
    storage = app.config["BOUNDLESS_RATELIMIT_STORAGE"] or default_ratelimit_storage(
        app.config["BOUNDLESS_DATABASE_URL"])
    limiter = RateLimiter(storage, cat.limits.day_timezone)
    upstream = UpstreamClient(float(app.config["BOUNDLESS_UPSTREAM_CONNECT_TIMEOUT"]),
                              float(app.config["BOUNDLESS_UPSTREAM_READ_TIMEOUT"]),
                              max_body=int(app.config["BOUNDLESS_UPSTREAM_MAX_BODY_BYTES"]))
    # Cool-downs live beside the rate-limit counters: shared by every worker and instance on that storage.
    cooldowns = Cooldowns(limiter.storage, routing.known_entries(cat))
    app.extensions["boundless"] = State(
        catalog=cat,
        limiter=limiter,
        keys=KeyCache(float(app.config["BOUNDLESS_KEY_CACHE_SECONDS"])),
        upstream=upstream,
        router=routing.Router(upstream, cooldowns, cat.routing),
    )

    from . import api
    api.init_app(app)
    from .api.admin import bp as admin_bp
    app.register_blueprint(admin_bp)
    from . import console
    console.init_app(app, storage)
    health.init_app(app)
    metrics.init_app(app)
    logs.init_app(app)
    refusals.init_app(app)
    inflight.init_app(app)
    return app
