"""GET /metrics end to end: gunicorn with 4 workers over HTTP. Whatever worker answers a scrape, it reports the
sum over all workers (prometheus-client multiprocess mode set up by gunicorn.conf.py). Counters are checked
as deltas around what each test does, on one gateway shared by the module."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support import PAID_IN
from support import PAID_OUT
from support import Gateway
from support import ledger_check

CHAT = "/api/v1/chat/completions"


def minute_room(need: float = 10.0) -> None:
    """Wait for the next wall-clock minute if fewer than ``need`` seconds are left in this one."""
    left = 60 - time.time() % 60
    if left < need:
        time.sleep(left + 0.1)


def scrape(gw, token: str | None = None) -> dict:
    """{(sample name, frozenset of labels): value} of one scrape."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = requests.get(gw.url + "/metrics", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def requests_of(model: str, status: int, route: str = CHAT, method: str = "POST") -> dict:
    return {"route": route, "method": method, "model": model, "status": str(status)}


def chat(gw, key, model="free-model", mock=None, stream=False, **kw) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], **kw}
    if stream:
        body["stream"] = True
    if mock:
        body["mock"] = mock
    return requests.post(gw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=30, stream=stream)


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(interval)


@pytest.fixture(scope="module")
def gw4(tmp_path_factory, mock):
    tmp = tmp_path_factory.mktemp("gw")
    gw = Gateway(tmp, mock.url, workers=4, env={"BOUNDLESS_METRICS_DIR": str(tmp / "metrics")}).start()
    gw.metrics_dir = tmp / "metrics"
    yield gw
    gw.stop()


def test_chat_requests_add_up_over_four_workers(gw4):
    key = gw4.create_key(rpm=1000, rpd=10000)
    n = 40
    before = scrape(gw4)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: chat(gw4, key, mock={"chunks": 3}).status_code, range(n)))
    assert statuses == [200] * n
    # every scrape, whichever worker serves it, sees the sum over the four workers
    for _ in range(12):
        after = scrape(gw4)
        assert delta(before, after, "boundless_requests_total", **requests_of("free-model", 200)) == n
        labels = {"model": "free-model", "stream": "false"}
        assert delta(before, after, "boundless_chat_latency_seconds_count", **labels) == n
        assert delta(before, after, "boundless_chat_ttfb_seconds_count", **labels) == n
        assert delta(before, after, "boundless_chat_latency_seconds_bucket", le="+Inf", **labels) == n
        assert delta(before, after, "boundless_completion_tokens_total", model="free-model") == 3 * n
        assert delta(before, after, "boundless_credits_charged_total", model="free-model") == 0
    # more than one worker wrote counters: one file per worker process
    files = [f for f in os.listdir(gw4.metrics_dir) if f.startswith("counter_")]
    assert len(files) >= 2, files


def worker_pids(gw) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(gw.proc.pid)], capture_output=True, text=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines() if "gunicorn" in line]


def test_tokens_and_credits_match_the_usage_and_the_ledger(gw4):
    name = "metrics-paid-" + str(time.time_ns())
    key = gw4.create_key(name=name, credit="10", rpm=1000, rpd=10000)
    before = scrape(gw4)
    usage = {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
    for _ in range(3):
        assert chat(gw4, key, model="paid-model", mock={"usage": usage}).status_code == 200
    with chat(gw4, key, model="paid-model", stream=True, mock={"usage": usage, "chunks": 3}) as resp:
        assert resp.status_code == 200
        resp.raw.read()
    after = wait_until(lambda: (s := scrape(gw4)) and delta(
        before, s, "boundless_requests_total", **requests_of("paid-model", 200)) == 4 and s)
    assert delta(before, after, "boundless_prompt_tokens_total", model="paid-model") == 4 * 10
    assert delta(before, after, "boundless_completion_tokens_total", model="paid-model") == 4 * 7
    micro = 4 * (10 * PAID_IN + 7 * PAID_OUT)
    credits = delta(before, after, "boundless_credits_charged_total", model="paid-model")
    assert credits == pytest.approx(micro / 1_000_000, abs=1e-9)
    # the ledger charged exactly that to this key
    balance, spent = ledger_check(gw4.database_url)[name]
    assert spent == micro
    assert delta(before, after, "boundless_chat_latency_seconds_count", model="paid-model", stream="true") == 1


def test_rate_limit_and_credit_refusals_are_counted(gw4):
    minute_room()
    before = scrape(gw4)
    per_minute = gw4.create_key(rpm=2, rpd=100)
    assert [chat(gw4, per_minute).status_code for _ in range(3)] == [200, 200, 429]
    per_day = gw4.create_key(rpm=100, rpd=1)
    assert [chat(gw4, per_day).status_code for _ in range(2)] == [200, 429]
    broke = gw4.create_key()                      # no credit
    assert chat(gw4, broke, model="paid-model").status_code == 402
    assert chat(gw4, broke, model="no-such-model").status_code == 404
    assert requests.get(gw4.base_url + "/models", timeout=10).status_code == 401
    after = scrape(gw4)
    assert delta(before, after, "boundless_ratelimit_refusals_total", window="minute") == 1
    assert delta(before, after, "boundless_ratelimit_refusals_total", window="day") == 1
    assert delta(before, after, "boundless_credit_refusals_total", model="paid-model") == 1
    assert delta(before, after, "boundless_requests_total", **requests_of("free-model", 429)) == 2
    assert delta(before, after, "boundless_requests_total", **requests_of("free-model", 200)) == 3
    assert delta(before, after, "boundless_requests_total", **requests_of("paid-model", 402)) == 1
    assert delta(before, after, "boundless_requests_total", **requests_of("", 404)) == 1     # not a catalogue id
    assert delta(before, after, "boundless_requests_total",
                 **requests_of("", 401, route="/api/v1/models", method="GET")) == 1
    # refused requests never reached the upstream: no latency observed, no tokens
    assert delta(before, after, "boundless_chat_latency_seconds_count", model="paid-model", stream="false") == 0
    # unknown paths share one label value, whatever the path
    for path in ("/nope/1", "/nope/2"):
        requests.get(gw4.url + path, timeout=10)
    after2 = scrape(gw4)
    assert delta(after, after2, "boundless_requests_total", **requests_of("", 404, "unmatched", "GET")) == 2
    assert not any("/nope" in str(labels) for _, labels in after2)


def test_upstream_errors_by_provider_and_kind_with_the_callers_status(gw4):
    key = gw4.create_key(rpm=1000, rpd=10000)
    before = scrape(gw4)
    assert chat(gw4, key, mock={"status": 503}).status_code == 502      # the caller gets our mapping
    assert chat(gw4, key, mock={"status": 504}).status_code == 504
    with chat(gw4, key, stream=True, mock={"cut_after": 2}) as resp:    # a stream that started: 200
        assert resp.status_code == 200
        resp.raw.read()
    after = wait_until(lambda: (s := scrape(gw4)) and delta(
        before, s, "boundless_upstream_errors_total", provider="mock", kind="upstream_cut") == 1 and s)
    assert delta(before, after, "boundless_upstream_errors_total", provider="mock", kind="upstream_error") == 2
    assert delta(before, after, "boundless_requests_total", **requests_of("free-model", 502)) == 1
    assert delta(before, after, "boundless_requests_total", **requests_of("free-model", 504)) == 1
    assert delta(before, after, "boundless_requests_total", **requests_of("free-model", 200)) == 1
    assert delta(before, after, "boundless_requests_total", **requests_of("free-model", 503)) == 0


def test_open_streams_gauge_goes_up_and_back_to_zero(gw4):
    key = gw4.create_key(rpm=1000, rpd=10000)
    k = 8
    assert value(scrape(gw4), "boundless_open_streams") == 0
    def read_all(_):
        with chat(gw4, key, stream=True, mock={"chunks": 30, "gap": 0.1}) as resp:
            assert resp.status_code == 200
            resp.raw.read()
        return True

    with ThreadPoolExecutor(k) as pool:
        futures = [pool.submit(read_all, i) for i in range(k)]
        assert wait_until(lambda: value(scrape(gw4), "boundless_open_streams") == k, timeout=10, interval=0.05)
        assert all(f.result(timeout=30) for f in futures)
    assert wait_until(lambda: value(scrape(gw4), "boundless_open_streams") == 0, timeout=10)

    # callers that hang up mid-stream: the gauge comes back too
    streams = [chat(gw4, key, stream=True, mock={"chunks": 100, "gap": 0.1}) for _ in range(4)]
    assert wait_until(lambda: value(scrape(gw4), "boundless_open_streams") == 4, timeout=10, interval=0.05)
    for resp in streams:
        resp.close()
    assert wait_until(lambda: value(scrape(gw4), "boundless_open_streams") == 0, timeout=10)


def test_killed_workers_leave_their_counters_and_drop_their_streams(gateway_factory, tmp_path):
    mdir = tmp_path / "metrics"
    mdir.mkdir()
    (mdir / "counter_999999.db").write_bytes(b"stale file of an earlier run")
    gw = gateway_factory(workers=2, env={"BOUNDLESS_METRICS_DIR": str(mdir)})
    assert not (mdir / "counter_999999.db").exists()             # emptied at start
    key = gw.create_key(rpm=1000, rpd=10000)
    for _ in range(6):
        assert chat(gw, key).status_code == 200
    streams = [chat(gw, key, stream=True, mock={"chunks": 200, "gap": 0.1}) for _ in range(4)]
    assert wait_until(lambda: value(scrape(gw), "boundless_open_streams") == 4, timeout=10, interval=0.05)
    old = worker_pids(gw)
    assert len(old) == 2
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    for resp in streams:
        resp.close()
    assert wait_until(lambda: len(set(worker_pids(gw)) - set(old)) == 2, timeout=20)

    def settled():
        try:
            s = scrape(gw)
        except requests.RequestException:
            return None
        return s if value(s, "boundless_open_streams") == 0 else None

    after = wait_until(settled, timeout=20)
    assert after, "the open-streams gauge kept the dead workers' streams"
    assert value(after, "boundless_requests_total", **requests_of("free-model", 200)) == 6   # history stays


def test_metrics_token(gateway_factory):
    token = "metrics-" + "t" * 30
    gw = gateway_factory(env={"BOUNDLESS_METRICS_TOKEN": token})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                    {"Authorization": f"Bearer {token}x"}):
        resp = requests.get(gw.url + "/metrics", headers=headers, timeout=10)
        assert resp.status_code == 401, resp.text
        assert resp.headers["Content-Type"].startswith("application/json")
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_metrics_token"
        assert token not in resp.text and "boundless_" not in resp.text
    assert "boundless_requests_total" in requests.get(
        gw.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).text
    scrape(gw, token)
    # the probes are not behind the token
    assert requests.get(gw.url + "/healthz", timeout=10).status_code == 200
