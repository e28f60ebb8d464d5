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
from flask import request

from ..accounting import billing
from ..accounting.billing import MAX_TOKENS
from ..upstream import guard
from ..upstream import proxy
from ..upstream import routing
from ..auth import authenticate
from ..errors import InvalidRequest
from ..errors import ModelNotFound
from ..jsonio import MAX_DEPTH
from ..jsonio import TooDeep
from ..jsonio import loads
from ..state import state
from . import bp


@bp.get("/models")
def list_models() -> Response:
    """The catalogue, in OpenAI's list shape."""
    data = [{"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by}
            for m in state().catalog.models.values() if not routing.missing_keys(m)]    # uncallable: left out
    return jsonify({"object": "list", "data": data})


@bp.get("/key")
def key_info() -> Response:
    """The calling key's balance, spending and limits (not rate-counted)."""
    key = authenticate()
    decision = g._boundless_rate
    return jsonify({"data": {**billing.key_summary(key.id), "rpm": decision.rpm, "rpd": decision.rpd,
                             "remaining_rpm": decision.remaining_rpm, "remaining_rpd": decision.remaining_rpd}})


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """auth (before_request) → validate → resolve → limit → reserve → upstream → relay → settle."""
    started = time.perf_counter()
    gw = state()
    key = authenticate()
    raw, body = parse_chat_body()
    model = gw.catalog.resolve(body["model"])
    if model is None:
        raise ModelNotFound(f"The model '{body['model']}' does not exist or you do not have access to it.",
                            param="model")
    g.boundless_model = model                  # for the log line and metrics of a refused request
    g._boundless_rate = decision = gw.limiter.hit(key.id, *gw.limits_for(key))
    if decision.refused:
        raise decision.error()
    stream = body.get("stream") is True
    lease = billing.reserve(key.id, model, body, raw, stream, g.request_id)
    with guard.settled_on_crash(lease, started, gw.finish):  # a bug of ours never leaves the credit held
        lease.context = {"key_name": key.name, "key_prefix": key.prefix, "method": request.method,
                         "path": request.path, "remote_addr": request.remote_addr}
        g.boundless_lease = lease              # from here on, the finish hooks report this request
        out, status, headers = proxy.forward(gw.upstream, model, body, lease, started, gw.finish, gw.streams,
                                             request.environ.get("gunicorn.socket"), router=gw.router)
        if not isinstance(out, bytes):
            out = guard.stream_net(out, lease)
    return Response(out, status=status, headers=headers)


def parse_chat_body() -> tuple[bytes, dict]:
    """The raw body and its JSON object, checked as far as the gateway itself needs it.

    :raise InvalidRequest: 400 for anything that is not a chat request.
    """
    raw = request.get_data(cache=False)        # 413 above MAX_CONTENT_LENGTH
    try:
        body = loads(raw, max_depth=MAX_DEPTH)
    except TooDeep:
        raise InvalidRequest(f"The JSON body nests objects and arrays deeper than {MAX_DEPTH} levels.") from None
    except ValueError:
        raise InvalidRequest("We could not parse the JSON body of your request. The body must be a JSON object "
                             "(see https://platform.openai.com/docs/api-reference/chat).") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string naming a model.", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("Every item of 'messages' must be an object.", param="messages")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):    # 1 == True: a membership test lets 1 through
        raise InvalidRequest("'stream' must be a boolean (true or false).", param="stream")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    for name in ("max_completion_tokens", "max_tokens"):
        limit = body.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > MAX_TOKENS:
            raise InvalidRequest(f"'{name}' must be at most {MAX_TOKENS}.", param=name)
    return raw, body
