"""
app.api.flow
~~~~~~~~~~~~

The request path that every model endpoint walks (chat completions, embeddings, Responses, Anthropic
Messages), written once: read the JSON body → resolve the model (and check that it serves this endpoint) →
limit → reserve → upstream → relay → settle → report. Each view validates its own body's fields and says which
provider API it is (:mod:`app.upstream.apis`); the rest is here, so every endpoint gets the same key check,
limits, credit, ledger, logs and metrics.
"""
from __future__ import annotations

import dataclasses

from flask import Response
from flask import g
from flask import request

from .. import policy
from ..accounting import billing
from ..accounting.billing import MAX_TOKENS
from ..accounting.billing import Bounds
from ..catalog import Model
from ..errors import InvalidRequest
from ..errors import ModelNotFound
from ..jsonio import MAX_DEPTH
from ..jsonio import TooDeep
from ..jsonio import loads
from ..keys import KeyInfo
from ..server import inflight
from ..state import state
from ..upstream import guard
from ..upstream import proxy
from ..upstream.apis import Api

def read_json_object(docs: str) -> tuple[bytes, dict]:
    """The raw body and its JSON object, with a string ``model``.

    :param docs: the API reference to point a caller to when the body is not JSON.
    :raise InvalidRequest: 400 when it is not.
    """
    raw = request.get_data(cache=False)        # 413 above MAX_CONTENT_LENGTH
    try:
        body = loads(raw, max_depth=MAX_DEPTH)
    except TooDeep:
        raise InvalidRequest(f"The JSON body nests objects and arrays deeper than {MAX_DEPTH} levels.") from None
    except ValueError:
        raise InvalidRequest(f"We could not parse the JSON body of your request. The body must be a JSON object "
                             f"(see {docs}).") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string naming a model.", param="model")
    return raw, body


def check_messages(body: dict) -> None:
    """:raise InvalidRequest: ``messages`` is not a non-empty array of objects (chat completions, Messages)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", param="messages")
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("Every item of 'messages' must be an object.", param="messages")


def check_stream(body: dict) -> bool:
    """Whether the caller asked for a stream. :raise InvalidRequest: ``stream`` is not a JSON boolean."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):    # 1 == True: a membership test lets 1 through
        raise InvalidRequest("'stream' must be a boolean (true or false).", param="stream")
    return stream is True


def check_limit(body: dict, name: str) -> None:
    """:raise InvalidRequest: the token limit ``name`` is beyond what the ledger's columns hold."""
    limit = body.get(name)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > MAX_TOKENS:
        raise InvalidRequest(f"'{name}' must be at most {MAX_TOKENS}.", param=name)


def resolve(key: KeyInfo, model_id: str, api: Api) -> Model:
    """The catalogue's model for ``model_id``, if this endpoint can serve it.

    :raise ModelNotFound: 404, not in the catalogue.
    :raise WrongEndpoint: 400, the model or its provider does not serve ``api``.
    """
    model = state().catalog.resolve(model_id)
    if model is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                            param="model")
    g.boundless_model = model                  # for the log line and metrics of a refused request
    api.check(model, _endpoint())
    policy.check_model(key, model)             # 403 model_not_allowed: before the limiter, so it costs no hit
    allowed = tuple(m for m in model.fallbacks if policy.allows(key, m.id))
    if allowed != model.fallbacks:             # never fall back to a model the key may not call (nor reserve for it)
        model = dataclasses.replace(model, fallbacks=allowed)
    return model


def _endpoint() -> str:
    """The endpoint as the caller knows it (``/embeddings``), for messages: the path without its prefix."""
    rule = request.url_rule
    path = rule.rule if rule is not None else request.path
    return "/" + path.split("/v1/", 1)[-1]


def relay(api: Api, key: KeyInfo, model: Model, body: dict, raw: bytes, stream: bool, started: float,
          bounds: Bounds | None = None) -> Response:
    """limit → reserve → upstream → relay → settle (in :mod:`app.upstream.proxy`), for a resolved model.

    :param bounds: the worst case to reserve; None: a chat body's.
    """
    gw = state()
    inflight.occupy(key)                       # 429 too_many_parallel_requests; freed when the response ends
    g._boundless_rate = decision = gw.limiter.hit(key.id, *gw.limits_for(key))
    if decision.refused:
        raise decision.error()
    lease = billing.reserve(key.id, model, body, raw, stream, g.request_id, bounds, tz=gw.budget_tz)
    with guard.settled_on_crash(lease, started, gw.finish):  # a bug of ours never leaves the credit held
        lease.context = {"key_name": key.name, "key_prefix": key.prefix, "method": request.method,
                         "path": request.path, "remote_addr": request.remote_addr}
        g.boundless_lease = lease              # from here on, the finish hooks report this request
        out, status, headers = proxy.forward(gw.upstream, model, body, lease, started, gw.finish, gw.streams,
                                             request.environ.get("gunicorn.socket"), api, request.headers,
                                             router=gw.router)
        if not isinstance(out, bytes):
            out = guard.stream_net(out, lease, api.sse_error)
    return Response(out, status=status, headers=headers)

