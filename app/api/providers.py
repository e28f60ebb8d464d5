"""
app.api.providers
~~~~~~~~~~~~~~~~~

``GET /api/v1/providers`` (any valid key): the providers and every model's routes with their state, ``ok``,
``cooling_down`` (until when) or ``failing`` (the last error), as this worker sees them; never an address,
a key variable or a key. (The ``X-Boundless-Model`` / ``X-Boundless-Route`` headers of an answer are set with the
blueprint's other headers, in app/api/__init__.py.)
"""
from __future__ import annotations

from flask import Response
from flask import jsonify

from ..state import state
from ..upstream import routing
from . import bp


@bp.get("/providers")
def list_providers() -> Response:
    """Provider and route health (authenticated by the blueprint's before_request)."""
    gw = state()
    return jsonify({"object": "list", **routing.health(gw.catalog, gw.router.cooldowns)})

