"""
app.sse
~~~~~~~

Watch an upstream's server-sent events on their way to the caller, without rewriting them.

The relay forwards whole events, byte for byte, as soon as each one is complete. It only *observes*: the
``usage`` object (for billing), ``data: [DONE]``, and how many content events went out (the estimate when a
stream ends without usage). It drops exactly one kind of event: the usage-only chunk (``"choices": []``) that
the gateway asked for on the caller's behalf when the caller did not ask for it. No Flask here.
"""
from __future__ import annotations

import re

from .jsonio import loads

_BOUNDARY = re.compile(rb"\r?\n\r?\n")
_CONTENT = re.compile(rb'"(?:reasoning_)?content"\s*:\s*"(?!")')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')

#: An event larger than this without a boundary is forwarded as is rather than buffered without end.
MAX_EVENT = 1 << 20


class EventRelay:
    """Split a byte stream into SSE events, observe them, and return what to forward."""

    def __init__(self, strip_usage_chunk: bool) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        self.buf = b""
        self.usage: dict | None = None
        self.done = False

    def feed(self, chunk: bytes) -> tuple[bytes, int]:
        """Take bytes from upstream; return (complete events to forward, number of content events in them)."""
        buf = self.buf + chunk if self.buf else chunk
        out: list[bytes] = []
        content = 0
        if b"\r" in buf:
            events = []
            start = 0
            for m in _BOUNDARY.finditer(buf):
                events.append(buf[start:m.end()])
                start = m.end()
            rest = buf[start:]
        else:                                   # the usual framing: split on blank lines without a regex
            *events, rest = buf.split(b"\n\n")
            events = [e + b"\n\n" for e in events]
        for event in events:
            keep, is_content = self._observe(event)
            if keep:
                out.append(event)
                content += is_content
        self.buf = rest
        if len(self.buf) > MAX_EVENT:
            out.append(self.buf)
            self.buf = b""
        return b"".join(out), content

    def flush(self) -> bytes:
        """What is left when the upstream ends (an event without its blank line)."""
        rest, self.buf = self.buf, b""
        if rest.strip():
            self._observe(rest)
            return rest
        return b""

    def _observe(self, event: bytes) -> tuple[bool, bool]:
        data = _data(event)
        if data is None:
            return True, False
        if data == b"[DONE]":
            self.done = True
            return True, False
        if b'"usage"' in data and _USAGE_OBJECT.search(data):   # not '"usage": null', which rides on every chunk
            try:
                obj = loads(data)
            except ValueError:
                return True, False
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                if self.strip_usage_chunk and obj.get("choices") == []:
                    return False, False
        return True, (b'content"' in data and bool(_CONTENT.search(data))
                      and not (b"[" in data and _EMPTY_CHOICES.search(data)))


def _data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event, or None for comments and other fields."""
    if event.startswith(b"data:") and event.count(b"data:") == 1:     # the common case, one data line
        return event[5:].strip()
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines).strip() if lines else None
