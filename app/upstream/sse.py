"""
app.upstream.sse
~~~~~~~~~~~~~~~~

Watch an upstream's server-sent events on their way to the caller.

The relay forwards whole events, byte for byte, as soon as each one is complete. It *observes*: the
``usage`` object (for billing), the stream's end (``data: [DONE]``), and how many content events went out (the
estimate when a stream ends without usage). It changes one thing: the value of an event's first ``model``
member, which names the catalogue id instead of the provider's name (:mod:`app.upstream.rename`). It drops
exactly one kind of event: the usage-only chunk (``"choices": []``) that the gateway asked for on the caller's
behalf when the caller did not ask for it.

:class:`EventRelay` watches chat completions; :class:`ResponsesRelay` (OpenAI's Responses API) and
:class:`MessagesRelay` (Anthropic's Messages API) watch the same things in those APIs' events. No Flask here.
"""
from __future__ import annotations

import re

from ..jsonio import loads
from .rename import ModelName

_BOUNDARY = re.compile(rb"\r?\n\r?\n")
_CONTENT = re.compile(rb'"(?:reasoning_)?content"\s*:\s*"(?!")')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')

#: An event larger than this without a boundary is forwarded as is rather than buffered without end.
MAX_EVENT = 1 << 20


class EventRelay:
    """Split a byte stream into SSE events, observe them, and return what to forward."""

    def __init__(self, strip_usage_chunk: bool, model: ModelName | None = None) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        self.model = model
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
                out, is_content = self._observe(event)
                return self._bounded(out), int(bool(out) and is_content)
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
            kept, is_content = self._observe(event)
            if kept:
                out.append(kept)
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
            return self._observe(rest)[0]
        return b""

    def _observe(self, event: bytes) -> tuple[bytes, bool]:
        """(what to forward of ``event``: itself, renamed, or b"" to drop it; whether it is a content event)."""
        data = _data(event)
        if data is None:
            return event, False
        if data == b"[DONE]":
            self.done = True
            return event, False
        if self.model is not None:
            event = self.model.event(event)
        # Each pattern is searched from the first place its key occurs, not from the start of the event.
        at = data.find(b'"usage"')
        if at >= 0 and _USAGE_OBJECT.search(data, at):   # not '"usage": null', which rides on every chunk
            try:
                obj = loads(data)
            except ValueError:
                return event, False
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                if self.strip_usage_chunk and obj.get("choices") == []:
                    return b"", False
        at = data.find(b'content"')
        if at < 0 or not _CONTENT.search(data, max(at - len(b'"reasoning_'), 0)):
            return event, False
        at = data.find(b'"choices"')
        return event, at < 0 or not _EMPTY_CHOICES.search(data, at)


def _event_name(event: bytes) -> bytes | None:
    """The name in an event's leading ``event:`` line (both APIs send one, equal to the data's ``type``)."""
    if not event.startswith(b"event:"):
        return None
    end = event.find(b"\n")
    return event[6:end if end >= 0 else len(event)].strip()


#: An event's ``"type"`` member (the first one is the event's own in both APIs' events).
_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_.]+)"')


class _TypedRelay(EventRelay):
    """A relay for APIs whose events say what they are in their ``type`` (Responses, Anthropic Messages).

    Subclasses name the event types that end the stream (:attr:`ends`), that carry content (:attr:`content`,
    counted for the estimate) and that carry usage (:meth:`_usage`); every other event is forwarded unread but
    for the ``model`` rename. Nothing is dropped: these APIs always report usage, so nothing was added.
    """

    ends: frozenset[bytes] = frozenset()
    content: frozenset[bytes] = frozenset()
    usage_events: frozenset[bytes] = frozenset()

    def __init__(self, model: ModelName | None = None) -> None:
        super().__init__(strip_usage_chunk=False, model=model)

    def _observe(self, event: bytes) -> tuple[bytes, bool]:
        kind = _event_name(event)
        if kind is not None and kind in self.content and (b"\ndata:" in event or b"\rdata:" in event):
            return event, True                         # the bulk of a stream: neither parsed nor renamed
        data = _data(event)
        if data is None:
            return event, False
        if kind is None:                               # no "event:" line: the data's own "type" says it
            m = _TYPE.search(data)
            kind = m.group(1) if m is not None else b""
        if kind in self.content:
            return event, True
        if self.model is not None:
            event = self.model.event(event)
        if kind in self.usage_events:
            try:
                obj = loads(data)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self._usage(kind, obj)
        if kind in self.ends:
            self.done = True
        return event, False

    def _usage(self, kind: bytes, obj: dict) -> None:
        raise NotImplementedError


class ResponsesRelay(_TypedRelay):
    """OpenAI's Responses API: the stream ends with ``response.completed`` (or ``.incomplete``/``.failed``),
    whose ``response.usage`` is the whole request's."""

    ends = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
    usage_events = ends
    content = frozenset({b"response.output_text.delta", b"response.refusal.delta", b"response.reasoning.delta",
                         b"response.reasoning_text.delta", b"response.reasoning_summary_text.delta",
                         b"response.function_call_arguments.delta"})

    def _usage(self, kind: bytes, obj: dict) -> None:
        response = obj.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict):
            self.usage = usage


class MessagesRelay(_TypedRelay):
    """Anthropic's Messages API: ``message_start`` carries the input tokens (``message.usage``), each
    ``message_delta`` the output tokens so far (``usage``, cumulative), and ``message_stop`` ends the stream.

    The usage counts as reported only once a ``message_delta`` has said the output tokens: a stream cut before
    it is estimated, as a chat stream without usage is."""

    ends = frozenset({b"message_stop"})
    usage_events = frozenset({b"message_start", b"message_delta"})
    content = frozenset({b"content_block_delta"})

    def __init__(self, model: ModelName | None = None) -> None:
        super().__init__(model)
        self._started: dict = {}

    def _usage(self, kind: bytes, obj: dict) -> None:
        if kind == b"message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._started = dict(usage)
        elif isinstance(obj.get("usage"), dict):
            self.usage = {**self._started, **{k: v for k, v in obj["usage"].items() if v is not None}}


def _data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event, or None for comments and other fields."""
    if event.startswith(b"data:") and event.count(b"data:") == 1:     # the common case, one data line
        return event[5:].strip()
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines).strip() if lines else None
