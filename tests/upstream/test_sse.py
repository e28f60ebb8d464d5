"""The SSE relay forwards whole events byte for byte and only observes them (and drops our usage chunk)."""
from __future__ import annotations

import json

from app.upstream.sse import EventRelay


def chunk(i, content, usage=False):
    body = {"id": "c", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    if usage:
        body["usage"] = None
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_passes_events_through_untouched_and_counts_content():
    relay = EventRelay(strip_usage_chunk=False)
    stream = chunk(0, "") + chunk(1, "Hi") + chunk(2, " there") + USAGE + DONE
    out, content = relay.feed(stream)
    assert out == stream
    assert content == 2                       # the empty first delta is not content
    assert relay.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert relay.done


def test_strips_only_the_usage_only_chunk_when_asked():
    relay = EventRelay(strip_usage_chunk=True)
    out, _ = relay.feed(chunk(1, "Hi", usage=True) + USAGE + DONE)
    assert out == chunk(1, "Hi", usage=True) + DONE
    assert relay.usage["total_tokens"] == 5


def test_usage_inside_a_content_chunk_is_kept():
    # DeepSeek-style: usage rides on the last chunk that still has choices; never drop content.
    ev = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    relay = EventRelay(strip_usage_chunk=True)
    assert relay.feed(ev) == (ev, 1)
    assert relay.usage == {"prompt_tokens": 1, "completion_tokens": 1}


def test_events_split_across_reads_and_inside_utf8():
    whole = chunk(1, "caf\u00e9 \U0001F600") + DONE
    cut = whole.index("\U0001F600".encode()) + 2          # in the middle of the emoji's 4 bytes
    relay = EventRelay(strip_usage_chunk=True)
    first, n1 = relay.feed(whole[:cut])
    assert first == b"" and n1 == 0                       # nothing forwarded until the event is whole
    second, n2 = relay.feed(whole[cut:])
    assert second == whole and n2 == 1


def test_crlf_comments_and_tail():
    relay = EventRelay(strip_usage_chunk=False)
    data = b": keep-alive\r\n\r\n" + b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n'
    out, content = relay.feed(data)
    assert out == data and content == 1
    assert relay.feed(b"data: [DONE]") == (b"", 0)
    assert relay.flush() == b"data: [DONE]" and relay.done



class _Reference:
    """The relay's first, plain version (split every read on blank lines, search each pattern from the
    start): the optimised one must forward and count exactly as it does."""

    import re as _re
    BOUNDARY = _re.compile(rb"\r?\n\r?\n")
    CONTENT = _re.compile(rb'"(?:reasoning_)?content"\s*:\s*"(?!")')
    EMPTY = _re.compile(rb'"choices"\s*:\s*\[\s*\]')
    USAGE = _re.compile(rb'"usage"\s*:\s*\{')

    def __init__(self, strip):
        self.strip, self.buf, self.usage, self.done = strip, b"", None, False

    def feed(self, chunk):
        buf = self.buf + chunk
        events, start = [], 0
        for m in self.BOUNDARY.finditer(buf):
            events.append(buf[start:m.end()])
            start = m.end()
        self.buf = buf[start:]
        out, content = b"", 0
        for event in events:
            keep, is_content = self.observe(event)
            if keep:
                out += event
                content += is_content
        if len(self.buf) > (1 << 20):
            out, self.buf = out + self.buf, b""
        return out, content

    def observe(self, event):
        lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
        if not lines:
            return True, False
        data = b"\n".join(lines).strip()
        if data == b"[DONE]":
            self.done = True
            return True, False
        if self.USAGE.search(data):
            try:
                obj = json.loads(data)
            except ValueError:
                return True, False
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                if self.strip and obj.get("choices") == []:
                    return False, False
        return True, bool(self.CONTENT.search(data)) and not self.EMPTY.search(data)


def _random_events(rng):
    def js(obj, compact):
        return json.dumps(obj, separators=(",", ":") if compact else None).encode()

    kinds = []
    for _ in range(rng.randint(1, 12)):
        compact = rng.random() < 0.5
        delta = rng.choice([{"content": "x y"}, {"content": ""}, {"reasoning_content": "hm"},
                            {"content": None, "reasoning_content": "r"}, {"role": "assistant"},
                            {"content": 'say "content": "x"'}])
        choices = rng.choice([[{"index": 0, "delta": delta}], []])
        usage = rng.choice([None, None, {"prompt_tokens": 2, "completion_tokens": 3}])
        body = js({"choices": choices, "usage": usage}, compact)
        event = rng.choice([b"data: " + body, b"data:" + body, b": comment", b"event: x\ndata: " + body,
                            b"data: [DONE]", b"data: {not json \"usage\": {"])
        kinds.append(event + rng.choice([b"\n\n", b"\n\n", b"\r\n\r\n", b"\n\n\n"]))
    return b"".join(kinds)


def test_the_relay_matches_the_plain_reference_on_random_streams():
    import random
    rng = random.Random(20261130)
    for _ in range(3000):
        stream = _random_events(rng)
        strip = rng.random() < 0.5
        fast, ref = EventRelay(strip_usage_chunk=strip), _Reference(strip)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
        for a, b in zip([0, *cuts], [*cuts, len(stream)]):
            assert fast.feed(stream[a:b]) == ref.feed(stream[a:b]), stream
        assert (fast.usage, fast.done, fast.buf) == (ref.usage, ref.done, ref.buf), stream
