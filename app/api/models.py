"""
app.api.models
~~~~~~~~~~~~~~

``GET /models/{id}``: one catalogue model in OpenAI's shape (``client.models.retrieve``). Ids may hold a slash
(``deepseek/deepseek-chat``). Not rate-counted, like every read.
"""
from __future__ import annotations

from flask import Response
from flask import jsonify

from .. import policy
from ..auth import authenticate
from ..errors import ModelNotFound
from ..state import state
from . import bp


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id: str) -> Response:
    """The model, or 404 ``model_not_found`` in OpenAI's shape."""
    model = state().catalog.resolve(model_id)
    if model is None or not policy.allows(authenticate(), model.id):    # a model the key may not use: a 404 too
        raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                            param="model")
    return jsonify({"id": model.id, "object": "model", "created": 0, "owned_by": model.owned_by})
