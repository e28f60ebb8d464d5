"""
app.upstream.rename
~~~~~~~~~~~~~~~~~~~

The answer's ``model`` field names the catalogue id the caller asked for, not the provider's name for it
(that one goes to the caller in the ``X-Boundless-Upstream-Model`` header: app/upstream/routing.py ``Answer``).

Only that value is replaced, in the answer's bytes: the rest of a JSON answer or an SSE event stays as the
provider wrote it. The value replaced is the first ``"model": "..."`` member of the text. A JSON string cannot
hold an unescaped quote, so that pattern only ever matches a real member, never text inside a string; and the
first such member is the one to rename on every API the gateway relays: a chat answer's and chunk's top-level
``model``, a Responses event's ``response.model``, an Anthropic ``message_start``'s ``message.model``, an
embeddings answer's ``model`` (its vectors hold no member named ``model``). A JSON answer is checked against
its parsed form, and rewritten whole in the rare case the first member was not the top-level one.
"""
from __future__ import annotations

import re

from ..jsonio import dumps
from ..jsonio import loads

_MEMBER = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


class ModelName:
    """Rename the ``model`` of an answer to the catalogue id ``model_id``."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.value = dumps(model_id)                 # the JSON string, with its quotes

    def event(self, data: bytes) -> bytes:
        """``data`` (an SSE event, or any JSON text) with its first ``model`` member renamed; the same bytes
        object when it has none or it is right already (the usual chat chunk costs one ``find``)."""
        at = data.find(b'"model"')
        if at < 0:
            return data
        m = _MEMBER.search(data, at)
        if m is None:
            return data
        start, end = m.start(1) - 1, m.end()
        if data[start:end] == self.value:
            return data
        return data[:start] + self.value + data[end:]

    def answer(self, data: bytes, obj: dict) -> bytes:
        """A whole JSON answer (``obj`` is its parsed form) with its top-level ``model`` renamed."""
        if not isinstance(obj.get("model"), str) or obj["model"] == self.model_id:
            return data
        at = data.find(b'"model"')
        m = _MEMBER.search(data, at) if at >= 0 else None
        if m is not None and _string(m.group(1)) == obj["model"]:
            return data[:m.start(1) - 1] + self.value + data[m.end():]
        return dumps({**obj, "model": self.model_id})   # the first member was a nested one: say it right


def _string(raw: bytes) -> str | None:
    try:
        return loads(b'"' + raw + b'"')
    except ValueError:
        return None
