"""
app.jsonio
~~~~~~~~~~

JSON for request and response bodies: orjson (several times faster than the standard library on the hot
path), with the standard library wherever orjson would change or refuse a value:

* orjson reads integers beyond 64 bits as floats, so a body with a run of 19 or more digits is parsed by
  ``json``, which keeps them exact (and writes them back exactly);
* orjson refuses a lone UTF-16 surrogate (``"\\ud83d"``), which JSON allows; ``json`` reads it, and
  :func:`dumps` writes it back as the same ``\\ud83d`` escape the caller sent (a lone surrogate has no UTF-8
  form), so the provider gets the caller's string unchanged and is the one to judge it.

Nesting is limited to :data:`MAX_DEPTH` levels when the caller asks for it (request bodies): deeper bodies are
refused before anything is reserved, because re-serialising them fails (orjson stops at 255 levels, ``json``
at Python's recursion limit) and no chat request needs them.
"""
from __future__ import annotations

import json
import re

import orjson

_LONG_NUMBER = re.compile(rb"\d{19}")

#: The deepest nesting of objects and arrays a request body may have (the body itself is level 1).
MAX_DEPTH = 128


class TooDeep(ValueError):
    """The JSON is nested deeper than allowed."""


def loads(data: bytes, max_depth: int | None = None):
    """Parse JSON; raise ValueError when it is not JSON, :class:`TooDeep` when nested deeper than ``max_depth``."""
    try:
        if _LONG_NUMBER.search(data):
            obj = json.loads(data)
        else:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = json.loads(data)  # what orjson refuses but JSON allows; raises ValueError if not JSON
    except RecursionError:           # nested deeper than the parsers go (orjson stops at 1024 levels)
        raise TooDeep("JSON nested too deeply") from None
    # Depth is at most the number of brackets, so most bodies need no walk at all.
    if max_depth is not None and data.count(b"[") + data.count(b"{") > max_depth and _deeper(obj, max_depth):
        raise TooDeep(f"JSON nested deeper than {max_depth} levels")
    return obj


def _deeper(obj, limit: int) -> bool:
    """Whether ``obj`` nests objects and arrays deeper than ``limit`` levels (iterative: no recursion limit)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > limit:
            return True
        for child in (node.values() if isinstance(node, dict) else node):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def dumps(obj) -> bytes:
    """Serialise to compact UTF-8 JSON (a lone surrogate as its ``\\uXXXX`` escape, see the module's doc)."""
    try:
        return orjson.dumps(obj)
    except TypeError:               # an integer beyond 64 bits or a lone surrogate, both valid JSON
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode()
        except UnicodeEncodeError:  # a lone surrogate: only its escape is valid UTF-8 JSON
            return json.dumps(obj, separators=(",", ":")).encode()
