"""
app.api
~~~~~~~

The ``/api/v1`` blueprint (also served under ``/v1``: :func:`init_app`): every route here is authenticated by
key and carries the rate-limit headers.

Top layer: the views narrate the request path and may import every area (``app.upstream``,
``app.accounting``, ``app.limits`` through ``app.state``, ``app.store``) and the plain modules. Nothing imports
it but ``create_app``.
"""
from __future__ import annotations

from flask import Blueprint
from flask import Response
from flask import g
from flask import request

from ..auth import authenticate
from ..accounting.billing import new_request_id
from ..errors import GatewayError
from ..errors import PermissionDenied
from ..state import state

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.before_request
def _authenticate() -> None:
    g.request_id = new_request_id()
    key = authenticate()
    if key.admin:                     # an admin key administers; it never spends (app/api/admin.py)
        raise PermissionDenied("An admin key may call the admin API only (/api/v1/keys, /usage, /ledger, "
                               "/audit), not this route.", code="admin_key")
    if request.method == "GET":       # reads are not counted, but they report what is left
        g._boundless_rate = state().limiter.peek(key.id, *state().limits_for(key))


@bp.after_request
def _headers(resp: Response) -> Response:
    """The request id, the rate-limit headers, and which model and provider answered (``X-Boundless-Model``,
    ``X-Boundless-Route``: app/upstream/routing.py), or last failed, for a request that called one."""
    rid = g.get("request_id")
    if rid:
        resp.headers["X-Request-Id"] = rid
    decision = g.get("_boundless_rate")
    key = g.get("_boundless_key")
    if decision is None and key is not None:      # refused before counting (400, 404): report, count nothing
        try:
            decision = state().limiter.peek(key.id, *state().limits_for(key))
        except GatewayError:
            decision = None
    if decision is not None:
        resp.headers.update(decision.headers())
    lease = g.get("boundless_lease")
    if lease is not None and lease.context.get("route_headers"):
        resp.headers.update(lease.context["route_headers"])
    return resp


def init_app(app) -> None:
    """Serve every route of ``bp`` under ``/api/v1`` and again under ``/v1``, for tools that assume OpenAI's
    prefix: the same blueprint registered twice, so a route added to it later has both prefixes too."""
    app.register_blueprint(bp)
    app.register_blueprint(bp, name="api_v1", url_prefix="/v1")


# The routes register themselves on ``bp``; imported last because they import ``bp`` from here.
from . import routes  # noqa: E402,F401
from . import models  # noqa: E402,F401
from . import embeddings  # noqa: E402,F401
from . import responses  # noqa: E402,F401
from . import messages  # noqa: E402,F401
from . import providers  # noqa: E402,F401
