"""The SSE relay forwards whole events byte for byte and only observes them (and drops our usage chunk)."""
from __future__ import annotations

import json

from app.sse import EventRelay


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

