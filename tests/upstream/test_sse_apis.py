"""The Responses and Anthropic Messages relays: usage, the stream's end, content counts, the model rename."""
from __future__ import annotations

import json

from app.accounting import usage
from app.upstream.rename import ModelName
from app.upstream.sse import MessagesRelay
from app.upstream.sse import ResponsesRelay


def ev(kind, **fields):
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, separators=(',', ':'))}\n\n".encode()


def test_responses_relay_reads_usage_from_completed_and_renames_the_model():
    relay = ResponsesRelay(ModelName("cat"))
    stream = [ev("response.created", response={"model": "up", "usage": None}),
              ev("response.output_text.delta", delta="a"), ev("response.output_text.delta", delta="b"),
              ev("response.completed", response={"model": "up", "usage": {"input_tokens": 3, "output_tokens": 2}})]
    out, content = relay.feed(b"".join(stream))
    assert content == 2 and relay.done
    assert relay.usage == {"input_tokens": 3, "output_tokens": 2}
    assert out.count(b'"model": "cat"') == 0 and out.count(b'"model":"cat"') == 2 and b'"up"' not in out
    assert usage.responses(relay.usage) == {"prompt_tokens": 3, "completion_tokens": 2}


def test_messages_relay_adds_cache_tokens_and_waits_for_message_delta():
    relay = MessagesRelay(ModelName("cat"))
    start = ev("message_start", message={"model": "up", "usage": {"input_tokens": 10, "output_tokens": 1,
                                                                  "cache_read_input_tokens": 5}})
    out, _ = relay.feed(start + ev("content_block_delta", delta={"type": "text_delta", "text": "hi"}))
    assert relay.usage is None and not relay.done and b'"model":"cat"' in out      # cut here: estimated
    relay.feed(ev("message_delta", usage={"output_tokens": 7}) + ev("message_stop"))
    assert relay.done and relay.usage == {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 5}
    assert usage.anthropic(relay.usage) == {"prompt_tokens": 15, "completion_tokens": 7}


def test_events_pass_through_byte_for_byte_when_the_model_is_right():
    relay = MessagesRelay(ModelName("up"))
    stream = ev("message_start", message={"model": "up", "usage": {"input_tokens": 1}}) + b": ping\n\n"
    assert relay.feed(stream)[0] == stream
