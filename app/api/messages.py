"""
app.api.messages
~~~~~~~~~~~~~~~~

``POST /messages``: Anthropic's Messages API (JSON and SSE), passed through to providers declared with
``api = "anthropic"``, for the Anthropic SDKs and Claude Code. The caller may send its key as ``x-api-key``
(app/auth.py); the provider's key goes upstream as ``x-api-key`` with the caller's ``anthropic-version`` and
``anthropic-beta``. Billed on ``usage.input_tokens`` (+ the cache tokens, at the input price) and
``output_tokens``; for streams, those of ``message_start`` and ``message_delta``. Errors on this route take
Anthropic's shape (app/errors.py).
"""
from __future__ import annotations

import time

from flask import Response

from ..accounting import usage
from ..auth import authenticate
from ..upstream.apis import MESSAGES
from . import bp
from . import flow

DOCS = "https://docs.anthropic.com/en/api/messages"


@bp.post("/messages")
def create_message() -> Response:
    """auth (before_request) → validate → resolve → limit → reserve → upstream → relay → settle."""
    started = time.perf_counter()
    key = authenticate()
    raw, body, stream = parse_messages_body()
    model = flow.resolve(key, body["model"], MESSAGES)
    return flow.relay(MESSAGES, key, model, body, raw, stream, started, usage.messages_bounds(body, model))


def parse_messages_body() -> tuple[bytes, dict, bool]:
    """:raise InvalidRequest: 400 for a body that is not a Messages request."""
    raw, body = flow.read_json_object(DOCS)
    flow.check_messages(body)
    stream = flow.check_stream(body)
    flow.check_limit(body, "max_tokens")
    return raw, body, stream
