"""
app.api.responses
~~~~~~~~~~~~~~~~~

``POST /responses``: OpenAI's Responses API (JSON and SSE), passed through to providers declared with
``responses = true``; billed on ``usage.input_tokens`` / ``usage.output_tokens`` (for streams, those of the
``response.completed`` event). No translation to chat completions: another provider's model is a 400.
"""
from __future__ import annotations

import time

from flask import Response

from ..accounting import usage
from ..auth import authenticate
from ..errors import InvalidRequest
from ..upstream.apis import RESPONSES
from . import bp
from . import flow

DOCS = "https://platform.openai.com/docs/api-reference/responses"


@bp.post("/responses")
def create_response() -> Response:
    """auth (before_request) → validate → resolve → limit → reserve → upstream → relay → settle."""
    started = time.perf_counter()
    key = authenticate()
    raw, body, stream = parse_responses_body()
    model = flow.resolve(key, body["model"], RESPONSES)
    return flow.relay(RESPONSES, key, model, body, raw, stream, started, usage.responses_bounds(body, model))


def parse_responses_body() -> tuple[bytes, dict, bool]:
    """:raise InvalidRequest: 400 for a body that is not a Responses request."""
    raw, body = flow.read_json_object(DOCS)
    items = body.get("input")
    if items is not None and not isinstance(items, str) and not (
            isinstance(items, list) and all(isinstance(i, dict) for i in items)):
        raise InvalidRequest("'input' must be a string or an array of input items (objects).", param="input")
    stream = flow.check_stream(body)
    flow.check_limit(body, "max_output_tokens")
    return raw, body, stream
