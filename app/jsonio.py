"""
app.jsonio
~~~~~~~~~~

JSON for request and response bodies: orjson (several times faster than the standard library on the hot
path), falling back to ``json`` only for what orjson refuses but JSON allows (integers beyond 64 bits).
"""
from __future__ import annotations

import json

import orjson


def loads(data: bytes | str):
    """Parse JSON; raise ValueError when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)     # raises ValueError (JSONDecodeError) for what is really not JSON


def dumps(obj) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:               # an integer beyond 64 bits, which the caller was free to send
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
