"""Per-key rate limits end to end: gunicorn (the shipped gunicorn.conf.py) over HTTP, the ``boundless`` CLI,
the real storages (the default SQLite file, a private memcached, Redis) and the fake upstream.

Header checks use plain ``requests``; the OpenAI SDK is used where the contract is about SDK behaviour.
The minute window is aligned to the wall clock, so every test that needs several requests in one window
first makes sure enough of the current minute is left (:func:`minute_room`) instead of loosening asserts.
"""
from __future__ import annotations

import datetime
import math
import threading
import time
import uuid
import zoneinfo
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from support import Memcached
from support import flush_redis
from support import free_port

REDIS_DB = 7
RATE_HEADERS = ("X-RateLimit-Remaining-RPM", "X-RateLimit-Remaining-RPD", "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def minute_room(need: float = 5.0) -> None:
    """Wait for the next wall-clock minute if fewer than ``need`` seconds are left in this one."""
    left = 60 - time.time() % 60
    if left < need:
        time.sleep(left + 0.1)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(gw, key: str, marker: str = "hi", timeout: float = 30, **extra) -> requests.Response:
    body = {"model": "free-model", "messages": [{"role": "user", "content": marker}], **extra}
    return requests.post(gw.base_url + "/chat/completions", json=body, headers=auth(key), timeout=timeout)


def get(gw, key: str, path: str) -> requests.Response:
    return requests.get(gw.base_url + path, headers=auth(key), timeout=30)


def rates(resp: requests.Response) -> tuple[int, int]:
    return int(resp.headers["X-RateLimit-Remaining-RPM"]), int(resp.headers["X-RateLimit-Remaining-RPD"])


def assert_openai_error(resp: requests.Response, status: int, type_: str | None = None,
                        code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if type_:
        assert body["error"]["type"] == type_, body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def seen_upstream(mock, marker: str) -> int:
    """How many chat requests carrying ``marker`` reached the fake upstream."""
    return sum(1 for r in mock.requests()
               if any(m.get("content") == marker for m in (r["body"].get("messages") or [])))


def seconds_to_next_minute() -> float:
    return 60 - time.time() % 60


def seconds_to_midnight(zone: str = "UTC") -> float:
    tz = zoneinfo.ZoneInfo(zone)
    now = datetime.datetime.now(tz)
    midnight = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(), tzinfo=tz)
    return midnight.timestamp() - now.timestamp()


# --------------------------------------------------------------------------------------------------
# 1. exact under concurrency, on each storage
# --------------------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "memcached", "redis"])
def storage(request):
    """The BOUNDLESS_RATELIMIT_STORAGE value for each storage ("" = the default SQLite file)."""
    if request.param == "sqlite":
        yield ""
    elif request.param == "memcached":
        mc = Memcached()
        try:
            yield mc.uri
        finally:
            mc.stop()
    else:
        yield flush_redis(REDIS_DB)
        flush_redis(REDIS_DB)


def test_concurrent_requests_admit_exactly_rpm(storage, gateway_factory, mock):
    gw = gateway_factory(workers=4, ratelimit_storage=storage)
    key = gw.create_key(rpm=10, rpd=1000)
    marker = "burst-" + uuid.uuid4().hex
    n = 40
    barrier = threading.Barrier(n)

    def one(_: int) -> requests.Response:
        barrier.wait()
        return chat(gw, key, marker)

    minute_room(8)
    with ThreadPoolExecutor(n) as pool:
        resps = list(pool.map(one, range(n)))

    assert Counter(r.status_code for r in resps) == {200: 10, 429: 30}, [r.text for r in resps if
                                                                       r.status_code not in (200, 429)]
    ok = [r for r in resps if r.status_code == 200]
    # Each admitted request saw its own count: the remaining values are exactly 9..0 and 999..990.
    assert sorted(rates(r)[0] for r in ok) == list(range(10))
    assert sorted(rates(r)[1] for r in ok) == list(range(990, 1000))
    for r in resps:
        if r.status_code == 429:
            # A refusal reads the day count while admitted requests may still be between their two increments.
            assert rates(r)[0] == 0 and 990 <= rates(r)[1] <= 1000
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            assert_openai_error(r, 429, "rate_limit_error", "rate_limit_exceeded")
    assert seen_upstream(mock, marker) == 10
    # The 30 refused requests used up nothing: the day has 990 left, the minute exactly 0.
    info = get(gw, key, "/key").json()["data"]
    assert (info["remaining_rpm"], info["remaining_rpd"]) == (0, 990)


# --------------------------------------------------------------------------------------------------
# 2. headers count down; the 429
# --------------------------------------------------------------------------------------------------

def test_headers_count_down_then_429(gateway):
    key = gateway.create_key(rpm=3, rpd=50)
    minute_room()
    seen = []
    for _ in range(3):
        r = chat(gateway, key)
        assert r.status_code == 200, r.text
        seen.append(rates(r))
        assert r.headers["x-ratelimit-limit-requests"] == "3"          # the minute is the tighter window
        assert r.headers["x-ratelimit-remaining-requests"] == str(seen[-1][0])
    assert seen == [(2, 49), (1, 48), (0, 47)]

    before = seconds_to_next_minute()
    r = chat(gateway, key)
    after = seconds_to_next_minute()
    err = assert_openai_error(r, 429, "rate_limit_error", "rate_limit_exceeded")
    assert rates(r) == (0, 47)
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= 60
    # Whole seconds until the next wall-clock minute, rounded up, as seen while the request was in flight.
    assert math.ceil(after) <= retry <= math.ceil(before)
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"] == ("1m0s" if retry == 60 else f"{retry}s")
    assert "x-should-retry" not in r.headers
    assert "3 requests per minute" in err["message"] and f"{retry}s" in err["message"]


# --------------------------------------------------------------------------------------------------
# 3. what counts
# --------------------------------------------------------------------------------------------------

def test_what_counts(gateway, mock):
    key = gateway.create_key(rpm=20, rpd=30)
    minute_room(8)

    # Reads carry the headers and count nothing.
    for path in ("/models", "/key", "/models", "/key"):
        r = get(gateway, key, path)
        assert r.status_code == 200 and rates(r) == (20, 30)
        assert all(h in r.headers for h in RATE_HEADERS)
        assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) == ("20", "20")
    assert get(gateway, key, "/key").json()["data"]["remaining_rpm"] == 20

    # 401s and 400s do not count.
    for bad in ("sk-" + "x" * 43, key[:-1] + ("A" if key[-1] != "A" else "B")):
        assert_openai_error(chat(gateway, bad), 401, code="invalid_api_key")
    r = requests.post(gateway.base_url + "/chat/completions", json={"model": "free-model"}, timeout=30)
    assert_openai_error(r, 401)
    for body in ({"model": "free-model"}, {"model": "free-model", "messages": []}, {"messages": [{"role": "user"}]}):
        r = requests.post(gateway.base_url + "/chat/completions", json=body, headers=auth(key), timeout=30)
        assert_openai_error(r, 400, "invalid_request_error")
    r = requests.post(gateway.base_url + "/chat/completions", data=b"{not json", headers=auth(key), timeout=30)
    assert_openai_error(r, 400, "invalid_request_error")
    r = get(gateway, key, "/key")
    assert rates(r) == (20, 30)
    assert (r.json()["data"]["remaining_rpm"], r.json()["data"]["remaining_rpd"]) == (20, 30)

    # A success counts.
    r = chat(gateway, key)
    assert r.status_code == 200 and rates(r) == (19, 29)

    # An upstream failure counts too, and its 502 carries the headers.
    marker = "fail-" + uuid.uuid4().hex
    r = chat(gateway, key, marker, mock={"status": 503})
    assert_openai_error(r, 502)
    assert seen_upstream(mock, marker) == 1
    assert rates(r) == (18, 28)
    r = get(gateway, key, "/models")
    assert rates(r) == (18, 28)
    data = get(gateway, key, "/key").json()["data"]
    assert (data["rpm"], data["rpd"], data["remaining_rpm"], data["remaining_rpd"]) == (20, 30, 18, 28)


def test_authenticated_refusals_carry_the_headers(gateway):
    # Refused after authentication but before counting (400 bad body, 404 unknown model): the headers say
    # what is left, and nothing is counted.
    key = gateway.create_key(rpm=20, rpd=30)
    minute_room()
    r = requests.post(gateway.base_url + "/chat/completions", json={"model": "free-model"}, headers=auth(key),
                      timeout=30)
    assert_openai_error(r, 400, "invalid_request_error")
    assert rates(r) == (20, 30) and r.headers["x-ratelimit-remaining-requests"] == "20"
    r = requests.post(gateway.base_url + "/chat/completions", headers=auth(key), timeout=30,
                      json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(r, 404, code="model_not_found")
    assert rates(r) == (20, 30)
    r = chat(gateway, key)
    assert r.status_code == 200 and rates(r) == (19, 29)


def test_429_uses_up_nothing(gateway):
    name = "k429-" + uuid.uuid4().hex[:8]
    key = gateway.create_key(name, rpm=2, rpd=30)
    minute_room(8)
    assert [rates(chat(gateway, key)) for _ in range(2)] == [(1, 29), (0, 28)]
    for _ in range(6):
        r = chat(gateway, key)
        assert r.status_code == 429 and rates(r) == (0, 28)
    data = get(gateway, key, "/key").json()["data"]
    assert (data["remaining_rpm"], data["remaining_rpd"]) == (0, 28)
    # Raise the minute limit: the next request is the 3rd of this minute and the 3rd of the day, so none of the
    # six 429s was counted in either window.
    gateway.cli("keys", "update", name, "--rpm", "10")
    r = chat(gateway, key)
    assert r.status_code == 200 and rates(r) == (7, 27)


# --------------------------------------------------------------------------------------------------
# 5. keys are independent; limits change without a restart
# --------------------------------------------------------------------------------------------------

def test_keys_independent_and_update_without_restart(gateway):
    a_name, b_name = "ka-" + uuid.uuid4().hex[:8], "kb-" + uuid.uuid4().hex[:8]
    a = gateway.create_key(a_name, rpm=2, rpd=40)
    b = gateway.create_key(b_name, rpm=2, rpd=40)
    minute_room(10)
    assert chat(gateway, a).status_code == 200
    assert chat(gateway, a).status_code == 200
    assert chat(gateway, a).status_code == 429
    r = chat(gateway, b)                              # b has its own bucket
    assert r.status_code == 200 and rates(r) == (1, 39)
    assert rates(get(gateway, a, "/key")) == (0, 38)

    gateway.cli("keys", "update", a_name, "--rpm", "5")
    r = chat(gateway, a)
    assert r.status_code == 200 and rates(r) == (2, 37)
    assert r.headers["x-ratelimit-limit-requests"] == "5"
    assert get(gateway, a, "/key").json()["data"]["rpm"] == 5

    # Lower b's daily limit to what it has already used: refused by the day at once.
    gateway.cli("keys", "update", b_name, "--rpd", "1")
    r = chat(gateway, b)
    err = assert_openai_error(r, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "per day" in err["message"] and r.headers["x-should-retry"] == "false"
    assert rates(r) == (1, 0)
    assert rates(chat(gateway, a)) == (1, 36)         # a is untouched by b's change


def test_catalogue_defaults_then_per_key_values(gateway):
    # The module's gateway has [limits] rpm = 20, rpd = 50 in its catalogue.
    name = "kdef-" + uuid.uuid4().hex[:8]
    key = gateway.create_key(name)
    r = get(gateway, key, "/key")
    assert rates(r) == (20, 50)
    assert (r.json()["data"]["rpm"], r.json()["data"]["rpd"]) == (20, 50)
    gateway.cli("keys", "update", name, "--rpm", "4", "--rpd", "9")
    r = get(gateway, key, "/models")
    assert rates(r) == (4, 9) and r.headers["x-ratelimit-limit-requests"] == "4"


# --------------------------------------------------------------------------------------------------
# 6. through the OpenAI SDK
# --------------------------------------------------------------------------------------------------

def test_sdk_rate_limit_error_per_minute(gateway):
    client = gateway.client(gateway.create_key(rpm=1, rpd=50))
    minute_room()
    raw = client.chat.completions.with_raw_response.create(model="free-model",
                                                           messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["X-RateLimit-Remaining-RPM"] == "0"
    assert raw.parse().choices[0].message.content
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="free-model", messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.status_code == 429
    assert 1 <= int(err.response.headers["Retry-After"]) <= 60
    assert "per minute" in err.message
    assert err.code == "rate_limit_exceeded"


def test_sdk_rate_limit_error_per_day(gateway):
    client = gateway.client(gateway.create_key(rpm=10, rpd=1))
    minute_room()          # also keeps both requests on one UTC day
    client.chat.completions.create(model="free-model", messages=[{"role": "user", "content": "hi"}])
    before = seconds_to_midnight()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="free-model", messages=[{"role": "user", "content": "hi"}])
    after = seconds_to_midnight()
    err = info.value
    headers = err.response.headers
    assert headers["x-should-retry"] == "false"
    retry = int(headers["Retry-After"])
    assert abs(retry - after) <= 2
    assert math.ceil(after) <= retry <= math.ceil(before)
    assert "per day" in err.message and "1 request per day" in err.message     # singular (issue 19.9)
    assert headers["X-RateLimit-Remaining-RPD"] == "0"
    assert headers["X-RateLimit-Remaining-RPM"] == "9"     # the refused request was given back to the minute
    assert headers["x-ratelimit-limit-requests"] == "1"


# --------------------------------------------------------------------------------------------------
# 4. a restart keeps the counts (default SQLite storage)
# --------------------------------------------------------------------------------------------------

def test_restart_keeps_counts(gateway):
    key = gateway.create_key(rpm=5, rpd=50)
    minute_room(20)       # the restart itself takes a few seconds
    assert [rates(chat(gateway, key)) for _ in range(2)] == [(4, 49), (3, 48)]
    gateway.restart()
    assert rates(get(gateway, key, "/key")) == (3, 48)
    r = chat(gateway, key)
    assert r.status_code == 200 and rates(r) == (2, 47)


# --------------------------------------------------------------------------------------------------
# 7. memory:// needs a single worker
# --------------------------------------------------------------------------------------------------

def test_memory_storage_refused_with_several_workers(gateway_factory):
    with pytest.raises(RuntimeError) as info:
        gateway_factory(workers=2, ratelimit_storage="memory://")
    log = str(info.value)
    assert "memory://" in log and "keeps counters inside each process" in log and "2 workers" in log
    assert "-w 1" in log

    # One worker is fine. (This gateway also checks that [limits] day_timezone reaches the limiter.)
    gw = gateway_factory(workers=1, ratelimit_storage="memory://", tz="Asia/Shanghai")
    key = gw.create_key(rpm=5, rpd=2)
    minute_room()
    assert [rates(chat(gw, key)) for _ in range(2)] == [(4, 1), (3, 0)]
    before = seconds_to_midnight("Asia/Shanghai")
    r = chat(gw, key)
    after = seconds_to_midnight("Asia/Shanghai")
    assert r.status_code == 429 and r.headers["x-should-retry"] == "false"
    assert math.ceil(after) <= int(r.headers["Retry-After"]) <= math.ceil(before)    # Shanghai's midnight


# --------------------------------------------------------------------------------------------------
# 8. storage unreachable: fail closed
# --------------------------------------------------------------------------------------------------

def test_unreachable_redis_fails_closed(gateway_factory, mock):
    gw = gateway_factory(workers=1, ratelimit_storage=f"redis://127.0.0.1:{free_port()}/0")
    key = gw.create_key(rpm=5, rpd=50)
    marker = "closed-" + uuid.uuid4().hex
    for _ in range(2):
        assert_openai_error(chat(gw, key, marker), 503, "service_unavailable", "ratelimit_unavailable")
    assert seen_upstream(mock, marker) == 0            # nothing went through unlimited
    assert_openai_error(get(gw, key, "/key"), 503, code="ratelimit_unavailable")


def test_memcached_stopped_mid_test_fails_closed(gateway_factory, mock):
    mc = Memcached()
    try:
        gw = gateway_factory(workers=2, ratelimit_storage=mc.uri)
        key = gw.create_key(rpm=5, rpd=50)
        marker = "mc-" + uuid.uuid4().hex
        minute_room()
        r = chat(gw, key, marker)
        assert r.status_code == 200 and rates(r) == (4, 49)
        mc.stop()
        for _ in range(4):      # both workers, whatever connections they had
            assert_openai_error(chat(gw, key, marker), 503, "service_unavailable", "ratelimit_unavailable")
        assert seen_upstream(mock, marker) == 1
    finally:
        if mc.proc.poll() is None:
            mc.stop()
