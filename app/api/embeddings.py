"""
app.api.embeddings
~~~~~~~~~~~~~~~~~~

``POST /embeddings``: OpenAI's embeddings body, forwarded to the model's provider (a catalogue model with
``kind = "embedding"``) and billed on the ``usage.prompt_tokens`` it reports, at the model's ``input_price``.
"""
from __future__ import annotations

import time

from flask import Response

from ..accounting import usage
from ..auth import authenticate
from ..errors import InvalidRequest
from ..upstream.apis import EMBEDDINGS
from . import bp
from . import flow

DOCS = "https://platform.openai.com/docs/api-reference/embeddings"


@bp.post("/embeddings")
def create_embeddings() -> Response:
    """auth (before_request) → validate → resolve → limit → reserve → upstream → settle."""
    started = time.perf_counter()
    key = authenticate()
    raw, body = parse_embeddings_body()
    model = flow.resolve(key, body["model"], EMBEDDINGS)
    return flow.relay(EMBEDDINGS, key, model, body, raw, False, started, usage.embeddings_bounds(body))


def parse_embeddings_body() -> tuple[bytes, dict]:
    """:raise InvalidRequest: 400 for a body that is not an embeddings request."""
    raw, body = flow.read_json_object(DOCS)
    if not _is_input(body.get("input")):
        raise InvalidRequest("'input' is required and must be a string, an array of strings, an array of token "
                             "ids or an array of token id arrays, none of them empty.", param="input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be \"float\" or \"base64\".", param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not _is_count(dims) or dims > 1_000_000):
        raise InvalidRequest("'dimensions' must be a positive integer.", param="dimensions")
    if body.get("stream") is not None:
        raise InvalidRequest("Embeddings are not streamed: remove 'stream'.", param="stream")
    return raw, body


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_tokens(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def _is_input(value) -> bool:
    if isinstance(value, str):
        return bool(value)
    if not isinstance(value, list) or not value:
        return False
    return (all(isinstance(v, str) and v for v in value) or _is_tokens(value)
            or all(_is_tokens(v) for v in value))
