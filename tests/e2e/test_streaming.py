"""Streams end to end: event by event, hang-ups close the upstream, cuts end in one error event, and 64 open
streams do not hold up a quick request."""
from __future__ import annotations

import json
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from support import events_with_times

MSG = [{"role": "user", "content": "hello there"}]


def open_stream(gw, key, mock=None, **extra):
    body = {"model": "free-model", "messages": MSG, "stream": True, **extra}
    if mock:
        body["mock"] = mock
    return requests.post(gw.base_url + "/chat/completions", json=body, stream=True, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})


def test_events_arrive_as_the_upstream_sends_them(gateway, key):
    start = time.monotonic()
    with open_stream(gateway, key, mock={"chunks": 5, "gap": 0.3}) as resp:
        got = events_with_times(resp)
    content = [(t, e) for t, e in got if '"content":"' in e and '"content":""' not in e]
    assert len(content) == 5
    gaps = [b[0] - a[0] for a, b in zip(content, content[1:])]
    # Buffering anywhere would deliver them together at the end; each must arrive about 0.3 s after the last.
    assert min(gaps) > 0.15, gaps
    assert content[0][0] - start < 1.0
    assert got[-1][1] == "data: [DONE]"


def test_utf8_split_inside_a_character(gateway, key):
    text = "héllo wörld 😀 done"
    stream = gateway.client(key).chat.completions.create(
        model="free-model", messages=MSG, stream=True,
        extra_body={"mock": {"content": text, "chunks": 4, "split_utf8": True}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_close_delimited_upstream_stream(gateway, key):
    with open_stream(gateway, key, mock={"close_delimited": True, "chunks": 3, "gap": 0.05}) as resp:
        body = resp.raw.read().decode()
    assert body.rstrip().endswith("data: [DONE]") and len(re.findall(r'"content":" ?tok', body)) == 3


def test_hang_up_closes_the_upstream_within_seconds(gateway, key, mock):
    mock.reset()
    resp = open_stream(gateway, key, mock={"chunks": 200, "gap": 0.1})
    it = resp.iter_lines()
    while b"tok1" not in next(it):
        pass
    hung_up = time.monotonic()
    resp.close()                                  # the caller goes away mid-stream
    rec = mock.wait_for(lambda r: r["client_closed"], timeout=10)
    assert rec is not None, "the upstream was never closed"
    assert rec["closed_at"] - time.time() + (time.monotonic() - hung_up) < 5
    assert rec["chunks_sent"] < 100
    # the gateway is still healthy
    assert requests.get(gateway.base_url + "/models", headers={"Authorization": f"Bearer {key}"},
                        timeout=5).status_code == 200


def _error_events(body: str):
    out = []
    for ev in body.split("\n\n"):
        if ev.startswith("data: {"):
            obj = json.loads(ev[6:])
            if "error" in obj:
                out.append(obj["error"])
    return out


@pytest.mark.parametrize(("knob", "code"), [
    ({"cut_after": 2, "chunks": 5}, "upstream_error"),
    ({"stall_after": 2, "stall": 8, "chunks": 5}, "upstream_timeout"),   # read timeout is 5 s in tests
])
def test_upstream_dying_mid_stream_ends_with_one_error_event(gateway, key, knob, code):
    with open_stream(gateway, key, mock=knob) as resp:
        assert resp.status_code == 200
        body = resp.raw.read().decode()
    errors = _error_events(body)
    assert len(errors) == 1 and errors[0]["code"] == code
    assert set(errors[0]) == {"message", "type", "param", "code"}
    assert len(re.findall(r'"content":" ?tok', body)) == 2
    # the SDK surfaces it as an error, and the gateway keeps serving
    with pytest.raises(openai.APIError):
        for _ in gateway.client(key).chat.completions.create(model="free-model", messages=MSG, stream=True,
                                                               extra_body={"mock": knob}):
            pass
    assert gateway.client(key).chat.completions.create(model="free-model", messages=MSG).choices


def test_64_open_streams_do_not_delay_a_quick_request(gateway_factory):
    gw = gateway_factory(rpm=1000, rpd=1000)       # the shipped gunicorn.conf.py (2 workers)
    key = gw.create_key()
    opened = threading.Barrier(65, timeout=30)
    finished = []

    def long_stream(_):
        with open_stream(gw, key, mock={"chunks": 30, "gap": 0.1}) as resp:
            it = resp.iter_lines()
            next(it)
            opened.wait()
            n = sum(1 for line in it if line.startswith(b"data: {"))
        finished.append(n)

    with ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(long_stream, i) for i in range(64)]
        opened.wait()                                # all 64 streams are open and flowing
        timings = []
        for _ in range(10):
            t = time.monotonic()
            r = requests.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            timings.append(time.monotonic() - t)
            assert r.status_code == 200
            time.sleep(0.1)
        for f in futures:
            f.result()
    assert len(finished) == 64 and all(n >= 30 for n in finished)
    assert statistics.median(timings) < 0.5 and max(timings) < 1.0, timings


def test_hang_up_during_upstream_silence_closes_it_within_seconds(gateway, key, mock):
    # A reasoning model can think for minutes without a byte; the caller leaving must not wait for it.
    mock.reset()
    resp = open_stream(gateway, key, mock={"chunks": 3, "stall_after": 1, "stall": 30})
    it = resp.iter_lines()
    while b"tok0" not in next(it):
        pass
    hung_up = time.time()
    resp.close()
    rec = mock.wait_for(lambda r: r["client_closed"], timeout=10)
    assert rec is not None, "the upstream stayed open during its silence"
    assert rec["closed_at"] - hung_up < 5 and rec["chunks_sent"] == 1


def test_upstream_connections_are_kept_alive_but_an_abandoned_one_is_not_reused(gateway, key, mock):
    """Answers read to the end leave their connection in the pool; a stream the caller left closes its own."""
    headers = {"Authorization": f"Bearer {key}"}
    url = gateway.base_url + "/chat/completions"
    mock.reset()
    for _ in range(6):
        assert requests.post(url, json={"model": "free-model", "messages": MSG}, headers=headers,
                             timeout=10).status_code == 200
        with open_stream(gateway, key, mock={"chunks": 2, "gap": 0.01}) as resp:
            assert resp.text.rstrip().endswith("data: [DONE]")
    done = mock.requests()
    assert len(done) == 12
    # Each worker process opens its connection once and reuses it (the gateway runs 2 workers).
    assert len({r["connection"] for r in done}) <= 2, [r["connection"] for r in done]

    resp = open_stream(gateway, key, mock={"chunks": 200, "gap": 0.05})
    it = resp.iter_lines()
    while b"tok1" not in next(it):
        pass
    resp.close()
    abandoned = mock.wait_for(lambda r: r["client_closed"], timeout=10)
    assert abandoned is not None
    for _ in range(4):
        assert requests.post(url, json={"model": "free-model", "messages": MSG}, headers=headers,
                             timeout=10).status_code == 200
    later = [r for r in mock.requests() if r["id"] > abandoned["id"]]
    assert len(later) == 4 and abandoned["connection"] not in {r["connection"] for r in later}
