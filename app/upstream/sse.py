"""
app.upstream.sse
~~~~~~~~~~~~~~~~

Watch an upstream's server-sent events on their way to the caller, without rewriting them.

The relay forwards whole events, byte for byte, as soon as each one is complete. It only *observes*: the
``usage`` object (for billing), ``data: [DONE]``, and how many content events went out (the estimate when a
stream ends without usage). It drops exactly one kind of event: the usage-only chunk (``"choices": []``) that
the gateway asked for on the caller's behalf when the caller did not ask for it. No Flask here.
"""
from __future__ import annotations

import re

from ..jsonio import loads

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
        if b"\r" not in buf:                    # the usual framing: events end with a blank line, "\n\n"
            end = buf.rfind(b"\n\n")
            if end >= 0 and buf.find(b"\n\n") == end:    # the usual read: one whole event, forwarded as is
                event, self.buf = buf[:end + 2], buf[end + 2:]
                keep, is_content = self._observe(event)
                return self._bounded(event if keep else b""), int(keep and is_content)
            *events, rest = buf.split(b"\n\n")
            events = [e + b"\n\n" for e in events]
        else:
            events = []
            start = 0
            for m in _BOUNDARY.finditer(buf):
                events.append(buf[start:m.end()])
                start = m.end()
            rest = buf[start:]
        out: list[bytes] = []
        content = 0
        for event in events:
            keep, is_content = self._observe(event)
            if keep:
                out.append(event)
                content += is_content
        self.buf = rest
        return self._bounded(b"".join(out)), content

    def _bounded(self, out: bytes) -> bytes:
        """``out``, plus what is buffered if that is an unfinished event larger than :data:`MAX_EVENT`."""
        if len(self.buf) > MAX_EVENT:
            out, self.buf = out + self.buf, b""
        return out

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
        # Each pattern is searched from the first place its key occurs, not from the start of the event.
        at = data.find(b'"usage"')
        if at >= 0 and _USAGE_OBJECT.search(data, at):   # not '"usage": null', which rides on every chunk
            try:
                obj = loads(data)
            except ValueError:
                return True, False
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                if self.strip_usage_chunk and obj.get("choices") == []:
                    return False, False
        at = data.find(b'content"')
        if at < 0 or not _CONTENT.search(data, max(at - len(b'"reasoning_'), 0)):
            return True, False
        at = data.find(b'"choices"')
        return True, at < 0 or not _EMPTY_CHOICES.search(data, at)


def _data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event, or None for comments and other fields."""
    if event.startswith(b"data:") and event.count(b"data:") == 1:     # the common case, one data line
        return event[5:].strip()
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines).strip() if lines else None
