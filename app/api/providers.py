"""
app.api.providers
~~~~~~~~~~~~~~~~~

``GET /api/v1/providers`` (any valid key): the providers and every model's routes with their state, ``ok``,
``cooling_down`` (until when) or ``failing`` (the last error), as this worker sees them; never an address,
a key variable or a key. And the ``X-Boundless-Model`` / ``X-Boundless-Route`` headers of a chat answer.
"""
from __future__ import annotations

from flask import Response
from flask import g
from flask import jsonify

from ..state import state
from ..upstream import routing
from . import bp


@bp.get("/providers")
def list_providers() -> Response:
    """Provider and route health (authenticated by the blueprint's before_request)."""
    gw = state()
    return jsonify({"object": "list", **routing.health(gw.catalog, gw.router.cooldowns)})


@bp.after_request
def _route_headers(resp: Response) -> Response:
    """Which model and provider answered (or last failed): on every answer of a request that called one."""
    lease = g.get("boundless_lease")
    headers = lease.context.get("route_headers") if lease is not None else None
    if headers:
        resp.headers.update(headers)
    return resp
