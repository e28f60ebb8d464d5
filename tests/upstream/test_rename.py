"""The answer's model field is renamed to the catalogue id, and nothing else in the bytes changes."""
from __future__ import annotations

import json

from app.upstream.rename import ModelName


def test_event_renames_the_first_model_member_only():
    name = ModelName("deepseek/deepseek-chat")
    event = b'data: {"id":"c","model" : "up-1","choices":[{"delta":{"content":"say \\"model\\":\\"x\\""}}]}\n\n'
    out = name.event(event)
    assert out == event.replace(b'"up-1"', b'"deepseek/deepseek-chat"')
    assert json.loads(out[6:])["choices"] == json.loads(event[6:])["choices"]


def test_event_without_model_or_already_right_is_the_same_object():
    name = ModelName("m")
    for event in (b'data: {"type":"content_block_delta","delta":{"text":"\\"model\\""}}\n\n',
                  b'data: {"model":"m","x":1}\n\n', b"data: [DONE]\n\n"):
        assert name.event(event) is event


def test_nested_model_of_a_responses_or_anthropic_event():
    name = ModelName("cat-id")
    event = b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1","model":"claude-x"}}\n\n'
    assert b'"model":"cat-id"' in name.event(event) and b"claude-x" not in name.event(event)


def test_answer_keeps_the_rest_byte_for_byte():
    name = ModelName("emb")
    data = b'{"object":"list","data":[{"embedding":[0.1, 0.2]}],"model":"up-emb","usage":{"prompt_tokens":2}}'
    assert name.answer(data, json.loads(data)) == data.replace(b'"up-emb"', b'"emb"')


def test_answer_whose_first_model_member_is_nested_is_rewritten_whole():
    name = ModelName("cat")
    data = b'{"content":[{"type":"tool_use","input":{"model":"other"}}],"model":"up"}'
    out = json.loads(name.answer(data, json.loads(data)))
    assert out["model"] == "cat" and out["content"][0]["input"]["model"] == "other"
