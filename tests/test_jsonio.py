"""Unit tests of app/jsonio.py: what orjson refuses or changes (lone surrogates, 64-bit overflow, deep
nesting) is read, written back unchanged, or refused with a ValueError, never an exception of another kind."""
from __future__ import annotations

import json

import pytest

from app.jsonio import MAX_DEPTH
from app.jsonio import TooDeep
from app.jsonio import dumps
from app.jsonio import loads


def test_a_lone_surrogate_is_read_and_written_back_as_the_caller_wrote_it():
    raw = b'{"messages":[{"role":"user","content":"\\ud83d"}],"x":"caf\xc3\xa9"}'
    body = loads(raw)
    assert body["messages"][0]["content"] == "\ud83d"
    out = dumps(body)                      # was UnicodeEncodeError: a lone surrogate has no UTF-8 form
    assert b"\\ud83d" in out
    out.decode("utf-8")                    # valid UTF-8 JSON...
    assert json.loads(out) == body         # ...with the same strings
    # a well-formed pair is one character and stays UTF-8
    assert dumps(loads(b'"\\ud83d\\ude00"')) == b'"' + "\U0001F600".encode() + b'"'


def test_integers_beyond_64_bits_stay_exact():
    big = 2**70 + 1
    assert loads(b'{"n": %d}' % big) == {"n": big}
    assert dumps({"n": big, "s": "\ud800"}) == b'{"n":%d,"s":"\\ud800"}' % big


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 300, 1000, 1025, 5000])
def test_nesting_deeper_than_the_limit_is_refused(depth):
    raw = b'{"messages":[],"x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    with pytest.raises(TooDeep):
        loads(raw, max_depth=MAX_DEPTH)
    assert issubclass(TooDeep, ValueError)


def test_nesting_up_to_the_limit_is_read_and_written():
    raw = b'{"x":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    body = loads(raw, max_depth=MAX_DEPTH)
    assert dumps(body) == raw
    # objects count like arrays; brackets inside strings are text
    objects = b'{"a":' * (MAX_DEPTH - 1) + b"{}" + b"}" * (MAX_DEPTH - 1)
    assert loads(objects, max_depth=MAX_DEPTH)
    with pytest.raises(TooDeep):
        loads(b'{"b":' + objects + b"}", max_depth=MAX_DEPTH)
    text = b'{"s":"' + b"[{" * 500 + b'"}'
    assert loads(text, max_depth=MAX_DEPTH) == {"s": "[{" * 500}
    # many containers side by side are not deep
    wide = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}] * 500}).encode()
    assert len(loads(wide, max_depth=MAX_DEPTH)["messages"]) == 500


def test_not_json_is_a_value_error():
    for raw in (b"{", b"", b"\xff", b'{"a":1}x', b"[" * 2000):
        with pytest.raises(ValueError):
            loads(raw, max_depth=MAX_DEPTH)
