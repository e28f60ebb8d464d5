"""
app.api.routes
~~~~~~~~~~~~~~

The views. Each narrates its request path; the work lives in plain modules.
"""
from __future__ import annotations

import time

from flask import Response
from flask import g
from flask import jsonify

from .. import policy
from ..accounting import billing
from ..upstream.apis import CHAT
from ..upstream import routing
from ..auth import authenticate
from ..errors import InvalidRequest
from ..state import state
from . import bp
from . import flow


@bp.get("/models")
def list_models() -> Response:
    """The catalogue models the key may call, in OpenAI's list shape."""
    key = authenticate()
    data = [{"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by}
            for m in state().catalog.models.values()
            if policy.allows(key, m.id) and not routing.missing_keys(m)]    # uncallable: left out
    return jsonify({"object": "list", "data": data})


@bp.get("/key")
def key_info() -> Response:
    """The calling key's balance, spending, limits and policy (not rate-counted)."""
    key = authenticate()
    decision = g._boundless_rate
    return jsonify({"data": {**billing.key_summary(key.id, state().budget_tz), "rpm": decision.rpm,
                             "rpd": decision.rpd, "remaining_rpm": decision.remaining_rpm,
                             "remaining_rpd": decision.remaining_rpd, **policy.describe(key, key.max_parallel)}})


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """auth (before_request) → validate → resolve → policy → limit → reserve → upstream → relay → settle."""
    started = time.perf_counter()
    key = authenticate()
    raw, body, stream = parse_chat_body()
    model = flow.resolve(key, body["model"], CHAT)
    return flow.relay(CHAT, key, model, body, raw, stream, started)


def parse_chat_body() -> tuple[bytes, dict, bool]:
    """The raw body, its JSON object and whether it asks for a stream, checked as far as the gateway needs.

    :raise InvalidRequest: 400 for anything that is not a chat request.
    """
    raw, body = flow.read_json_object("https://platform.openai.com/docs/api-reference/chat")
    flow.check_messages(body)
    stream = flow.check_stream(body)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    for name in ("max_completion_tokens", "max_tokens"):
        flow.check_limit(body, name)
    return raw, body, stream
