"""Unit tests of app/limits/ratelimit.py (RateLimiter, Decision, headers, errors) and app/limits/sqlite_storage.py.

In-process and fast: the limiter gets an injected ``clock`` and a private ``sqlite://`` file per test; the
concurrency tests fork real processes that share that file, the way gunicorn workers do.
"""
from __future__ import annotations

import datetime
import math
import multiprocessing
import sqlite3
import threading
import time
import zoneinfo

import pytest
from limits.storage import storage_from_string

from app.errors import ConfigurationError
from app.errors import RateLimited
from app.limits.ratelimit import Decision
from app.limits.ratelimit import RateLimiter
from app.limits.ratelimit import duration
from app.limits.ratelimit import retry_after
from app.limits.sqlite_storage import SQLiteStorage

UTC = datetime.timezone.utc


def ts(zone: str, *args: int, fold: int = 0) -> float:
    """The POSIX timestamp of a wall-clock time in ``zone``."""
    return datetime.datetime(*args, tzinfo=zoneinfo.ZoneInfo(zone), fold=fold).timestamp()


class Clock:
    """A settable clock for ``RateLimiter(..., clock=...)``."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'ratelimit.db'}"


def limiter(uri: str, t: float, tz: str = "UTC") -> tuple[RateLimiter, Clock]:
    clock = Clock(t)
    return RateLimiter(uri, tz, clock=clock), clock


# A fixed point well inside a minute: 2024-06-12 10:20:15.25 UTC.
T0 = ts("UTC", 2024, 6, 12, 10, 20, 15) + 0.25


# --------------------------------------------------------------------------------------------------
# duration(), retry_after(), Decision
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [
    (0, "0ms"), (-2.5, "0ms"), (0.25, "250ms"), (0.999, "999ms"), (1, "1s"), (1.001, "2s"), (12, "12s"),
    (59.2, "1m0s"), (60, "1m0s"), (61, "1m1s"), (3599, "59m59s"), (3600, "1h0m0s"), (21725, "6h2m5s"),
    (86400, "24h0m0s"), (90000, "25h0m0s"),
])
def test_duration_format(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize("seconds, whole", [
    (-5, 1), (0, 1), (0.0001, 1), (0.5, 1), (1, 1), (1.0001, 2), (29.5, 30), (59.999, 60), (60, 60),
    (86399.2, 86400),
])
def test_retry_after_is_whole_never_zero_never_past_the_window(seconds, whole):
    assert retry_after(seconds) == whole
    assert retry_after(seconds) >= 1
    if seconds >= 1:     # rounds up by less than a second: the window is open when the client comes back
        assert seconds <= retry_after(seconds) < seconds + 1


def test_headers_minute_is_tighter():
    d = Decision(rpm=10, rpd=100, used_rpm=3, used_rpd=50, reset_rpm=12.3, reset_rpd=3600)
    assert d.remaining_rpm == 7 and d.remaining_rpd == 50
    assert d.headers() == {
        "X-RateLimit-Remaining-RPM": "7",
        "X-RateLimit-Remaining-RPD": "50",
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "7",
        "x-ratelimit-reset-requests": "13s",
    }


def test_headers_day_is_tighter():
    d = Decision(rpm=10, rpd=100, used_rpm=1, used_rpd=97, reset_rpm=40, reset_rpd=7384.5)
    assert d.headers() == {
        "X-RateLimit-Remaining-RPM": "9",
        "X-RateLimit-Remaining-RPD": "3",
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "2h3m5s",
    }


def test_headers_tie_reports_the_minute():
    # Both windows leave 2: the minute reopens first, so it is the one worth reporting.
    d = Decision(rpm=5, rpd=7, used_rpm=3, used_rpd=5, reset_rpm=30, reset_rpd=5000)
    h = d.headers()
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("5", "2")


def test_headers_when_refused_report_the_refusing_window():
    # Refused by the day while the minute still has room: the day is reported even though RPM is 0 too.
    day = Decision(rpm=5, rpd=4, used_rpm=5, used_rpd=4, reset_rpm=10, reset_rpd=100, refused="day")
    assert day.headers()["x-ratelimit-limit-requests"] == "4"
    assert day.headers()["x-ratelimit-reset-requests"] == "1m40s"
    # Refused by the minute while the day is also exhausted: the minute is reported.
    minute = Decision(rpm=5, rpd=4, used_rpm=5, used_rpd=4, reset_rpm=10, reset_rpd=100, refused="minute")
    assert minute.headers()["x-ratelimit-limit-requests"] == "5"
    assert minute.headers()["x-ratelimit-reset-requests"] == "10s"


def test_remaining_never_negative():
    # A limit lowered below what was already used this window.
    d = Decision(rpm=2, rpd=3, used_rpm=5, used_rpd=9, reset_rpm=1, reset_rpd=1)
    assert (d.remaining_rpm, d.remaining_rpd) == (0, 0)
    assert d.headers()["X-RateLimit-Remaining-RPM"] == "0"
    assert d.headers()["x-ratelimit-remaining-requests"] == "0"


def test_error_minute():
    d = Decision(rpm=10, rpd=100, used_rpm=10, used_rpd=40, reset_rpm=17.2, reset_rpd=5000, refused="minute")
    err = d.error()
    assert isinstance(err, RateLimited) and err.status == 429
    body = err.to_dict()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
    msg = body["error"]["message"]
    assert "10 requests per minute" in msg and "18s" in msg
    assert err.headers["Retry-After"] == "18"
    assert "x-should-retry" not in {k.lower() for k in err.headers}
    assert err.headers["X-RateLimit-Remaining-RPM"] == "0"
    assert err.headers["X-RateLimit-Remaining-RPD"] == "60"
    assert err.headers["x-ratelimit-limit-requests"] == "10"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    resp = err.response()
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "18"


def test_error_day():
    d = Decision(rpm=10, rpd=100, used_rpm=3, used_rpd=100, reset_rpm=17.2, reset_rpd=3723.4, refused="day")
    err = d.error()
    msg = err.to_dict()["error"]["message"]
    assert "100 requests per day" in msg and "midnight" in msg and "1h2m4s" in msg
    assert err.headers["Retry-After"] == "3724"
    assert err.headers["x-should-retry"] == "false"
    assert err.headers["X-RateLimit-Remaining-RPM"] == "7"
    assert err.headers["X-RateLimit-Remaining-RPD"] == "0"
    assert err.headers["x-ratelimit-limit-requests"] == "100"
    assert err.headers["x-ratelimit-reset-requests"] == "1h2m4s"


def test_error_retry_after_never_zero_at_the_window_edge():
    d = Decision(rpm=1, rpd=9, used_rpm=1, used_rpd=1, reset_rpm=0.0004, reset_rpd=9, refused="minute")
    assert d.error().headers["Retry-After"] == "1"


# --------------------------------------------------------------------------------------------------
# RateLimiter on a private sqlite:// file, with an injected clock
# --------------------------------------------------------------------------------------------------

def test_countdown_and_minute_refusal(uri):
    rl, clock = limiter(uri, T0)
    seen = [rl.hit(1, 3, 50) for _ in range(3)]
    assert [d.refused for d in seen] == [None, None, None]
    assert [d.remaining_rpm for d in seen] == [2, 1, 0]
    assert [d.remaining_rpd for d in seen] == [49, 48, 47]
    assert seen[0].reset_rpm == pytest.approx(60 - 15.25)

    refused = rl.hit(1, 3, 50)
    assert refused.refused == "minute"
    assert (refused.remaining_rpm, refused.remaining_rpd) == (0, 47)
    err = refused.error()
    assert err.headers["Retry-After"] == "45"          # 44.75 s to 10:21:00, rounded up
    assert "per minute" in err.message

    # The refused hits gave their increments back: the counters stay at 3 and 3.
    for _ in range(5):
        assert rl.hit(1, 3, 50).refused == "minute"
    peek = rl.peek(1, 3, 50)
    assert (peek.used_rpm, peek.used_rpd, peek.refused) == (3, 3, None)
    m_key, d_key, _, _ = rl._windows(1)
    assert rl.storage.get(m_key) == 3 and rl.storage.get(d_key) == 3

    # A second before the minute ends: still refused, Retry-After 1.
    clock.t = ts("UTC", 2024, 6, 12, 10, 20, 59) + 0.5
    assert rl.hit(1, 3, 50).error().headers["Retry-After"] == "1"

    # The next wall-clock minute is a fresh window; the day keeps counting.
    clock.t = ts("UTC", 2024, 6, 12, 10, 21, 0)
    d = rl.hit(1, 3, 50)
    assert d.refused is None and (d.remaining_rpm, d.remaining_rpd) == (2, 46)
    assert d.reset_rpm == pytest.approx(60)


def test_minute_windows_are_aligned_to_the_wall_clock(uri):
    rl, clock = limiter(uri, ts("UTC", 2024, 6, 12, 10, 20, 58))
    assert rl.hit(1, 1, 50).refused is None
    assert rl.hit(1, 1, 50).refused == "minute"
    clock.t += 2.5                                     # 10:21:00.5: two and a half seconds later, a new minute
    assert rl.hit(1, 1, 50).refused is None


def test_day_refusal_gives_back_both_counts(uri):
    rl, clock = limiter(uri, T0)
    assert [rl.hit(1, 10, 2).remaining_rpd for _ in range(2)] == [1, 0]
    for _ in range(4):
        d = rl.hit(1, 10, 2)
        assert d.refused == "day"
        assert (d.used_rpm, d.remaining_rpm, d.remaining_rpd) == (2, 8, 0)
    peek = rl.peek(1, 10, 2)
    assert (peek.used_rpm, peek.used_rpd) == (2, 2)     # neither window kept the refused hits
    err = d.error()
    assert err.headers["x-should-retry"] == "false"
    midnight = ts("UTC", 2024, 6, 13, 0, 0, 0)
    assert err.headers["Retry-After"] == str(math.ceil(midnight - T0))
    assert "2 requests per day" in err.message
    # A new minute does not help: the day is still spent, and the minute count is still only 2 + 0.
    clock.t += 60
    assert rl.hit(1, 10, 2).refused == "day"
    assert rl.peek(1, 10, 2).used_rpm == 0


def test_minute_refusal_does_not_touch_the_day(uri):
    rl, _ = limiter(uri, T0)
    rl.hit(1, 1, 5)
    for _ in range(10):
        assert rl.hit(1, 1, 5).refused == "minute"
    assert rl.peek(1, 1, 5).used_rpd == 1


def test_zero_limits_refuse_everything(uri):
    rl, _ = limiter(uri, T0)
    assert rl.hit(1, 0, 5).refused == "minute"
    assert rl.hit(1, 5, 0).refused == "day"
    assert (rl.peek(1, 5, 5).used_rpm, rl.peek(1, 5, 5).used_rpd) == (0, 0)


def test_keys_are_independent(uri):
    rl, _ = limiter(uri, T0)
    for _ in range(2):
        assert rl.hit(1, 2, 10).refused is None
    assert rl.hit(1, 2, 10).refused == "minute"
    d = rl.hit(2, 2, 10)
    assert d.refused is None and (d.used_rpm, d.used_rpd) == (1, 1)
    assert rl.peek(1, 2, 10).used_rpm == 2 and rl.peek(12, 2, 10).used_rpm == 0
    assert rl.peek(3, 2, 10).used_rpd == 0


def test_limiters_share_the_file(uri):
    # Two limiters (as in two workers) on one file see one count.
    a, _ = limiter(uri, T0)
    b, _ = limiter(uri, T0)
    assert a.hit(1, 2, 10).remaining_rpm == 1
    assert b.hit(1, 2, 10).remaining_rpm == 0
    assert a.hit(1, 2, 10).refused == "minute"


def test_peek_counts_nothing(uri):
    rl, _ = limiter(uri, T0)
    for _ in range(5):
        d = rl.peek(1, 3, 4)
        assert (d.used_rpm, d.used_rpd, d.remaining_rpm, d.remaining_rpd) == (0, 0, 3, 4)
    rl.hit(1, 3, 4)
    assert rl.peek(1, 3, 4).headers()["X-RateLimit-Remaining-RPM"] == "2"


@pytest.mark.parametrize("zone, now, seconds_left", [
    # Asia/Shanghai is UTC+8 all year: 23:59:30 local is 15:59:30 UTC.
    ("Asia/Shanghai", ("Asia/Shanghai", 2024, 3, 9, 23, 59, 30), 30),
    ("Asia/Shanghai", ("Asia/Shanghai", 2024, 3, 10, 0, 0, 0), 86400),
    ("Asia/Shanghai", ("UTC", 2024, 3, 9, 23, 0, 0), 17 * 3600),             # 07:00 local on the 10th
    ("America/New_York", ("America/New_York", 2024, 1, 15, 23, 59, 59), 1),
    ("America/New_York", ("UTC", 2024, 1, 16, 4, 59, 50), 10),               # 23:59:50 EST
    # Spring forward (2024-03-10 02:00 EST -> 03:00 EDT): that day has 23 hours.
    ("America/New_York", ("America/New_York", 2024, 3, 10, 0, 0, 30), 23 * 3600 - 30),
    ("America/New_York", ("America/New_York", 2024, 3, 10, 1, 59, 59), 21 * 3600 + 1),
    ("America/New_York", ("America/New_York", 2024, 3, 10, 3, 0, 0), 21 * 3600),
    # Fall back (2024-11-03 02:00 EDT -> 01:00 EST): that day has 25 hours.
    ("America/New_York", ("America/New_York", 2024, 11, 3, 0, 0, 30), 25 * 3600 - 30),
    ("America/New_York", ("America/New_York", 2024, 11, 3, 23, 59, 0), 60),
    ("UTC", ("UTC", 2024, 6, 12, 23, 59, 59), 1),
])
def test_daily_reset_is_the_next_midnight_of_the_zone(uri, zone, now, seconds_left):
    t = ts(*now)
    rl, _ = limiter(uri, t, zone)
    assert rl.peek(7, 5, 1).reset_rpd == pytest.approx(seconds_left)
    assert rl.hit(7, 5, 1).refused is None
    refused = rl.hit(7, 5, 1)
    assert refused.refused == "day"
    err = refused.error()
    assert err.headers["Retry-After"] == str(seconds_left)
    assert err.headers["x-ratelimit-reset-requests"] == duration(seconds_left)


def test_fall_back_repeated_hour_is_the_same_day(uri):
    # 01:30 EDT and 01:30 EST on 2024-11-03 are an hour apart but the same calendar day.
    first = ts("America/New_York", 2024, 11, 3, 1, 30, 0, fold=0)
    second = ts("America/New_York", 2024, 11, 3, 1, 30, 0, fold=1)
    assert second - first == 3600
    rl, clock = limiter(uri, first, "America/New_York")
    assert rl.hit(1, 5, 1).refused is None
    clock.t = second
    d = rl.hit(1, 5, 1)
    assert d.refused == "day"
    assert d.reset_rpd == pytest.approx(22.5 * 3600)


@pytest.mark.parametrize("zone, before, after", [
    # 23:59:50 -> 00:00:05 local; in Shanghai the UTC date does not change (15:59 -> 16:00 UTC).
    ("Asia/Shanghai", ("Asia/Shanghai", 2024, 3, 9, 23, 59, 50), ("Asia/Shanghai", 2024, 3, 10, 0, 0, 5)),
    ("America/New_York", ("America/New_York", 2024, 3, 9, 23, 59, 50),
     ("America/New_York", 2024, 3, 10, 0, 0, 5)),
    ("America/New_York", ("America/New_York", 2024, 11, 3, 23, 59, 50),
     ("America/New_York", 2024, 11, 4, 0, 0, 5)),
    ("UTC", ("UTC", 2024, 12, 31, 23, 59, 50), ("UTC", 2025, 1, 1, 0, 0, 5)),
])
def test_a_new_calendar_day_gives_a_fresh_daily_count(uri, zone, before, after):
    rl, clock = limiter(uri, ts(*before), zone)
    assert rl.hit(1, 100, 2).refused is None
    assert rl.hit(1, 100, 2).refused is None
    assert rl.hit(1, 100, 2).refused == "day"
    clock.t = ts(*after)
    d = rl.hit(1, 100, 2)
    assert d.refused is None and d.used_rpd == 1


def test_the_day_follows_the_zone_not_utc(uri):
    # 2024-03-10 17:00 UTC is 01:00 on the 11th in Shanghai; 18:00 UTC is still the 11th there.
    rl, clock = limiter(uri, ts("UTC", 2024, 3, 10, 15, 30), "Asia/Shanghai")    # 23:30 on the 10th
    assert rl.hit(1, 100, 1).refused is None
    clock.t = ts("UTC", 2024, 3, 10, 17, 0)
    assert rl.hit(1, 100, 1).refused is None                                     # a new day in Shanghai
    clock.t = ts("UTC", 2024, 3, 10, 18, 0)
    assert rl.hit(1, 100, 1).refused == "day"


def test_a_clock_set_back_counts_in_the_earlier_day_again(uri):
    """The limiter keeps the current local day between requests; a clock set back (NTP, an operator) must
    land in the right day's window, not the kept one."""
    rl, clock = limiter(uri, ts("Asia/Shanghai", 2024, 3, 11, 0, 30), "Asia/Shanghai")
    assert rl.hit(1, 100, 1).refused is None                                     # the 11th: its one request
    clock.t = ts("Asia/Shanghai", 2024, 3, 10, 23, 59)
    d = rl.hit(1, 100, 1)
    assert d.refused is None and d.reset_rpd == pytest.approx(60)                # the 10th: a fresh day
    clock.t = ts("Asia/Shanghai", 2024, 3, 11, 8, 0)
    assert rl.hit(1, 100, 1).refused == "day"                                    # the 11th's count was kept


def test_sqlite_limiter_rejects_a_storage_without_a_file():
    with pytest.raises(ConfigurationError, match="BOUNDLESS_RATELIMIT_STORAGE"):
        RateLimiter("sqlite:///:memory:")
    with pytest.raises(ConfigurationError):
        RateLimiter("sqlite://")
    with pytest.raises(ConfigurationError):
        RateLimiter("nosuchscheme://x")


def test_memory_limiter_gives_back_too():
    rl = RateLimiter("memory://", clock=Clock(T0))
    assert rl.in_memory
    assert rl.hit(1, 1, 5).refused is None
    assert rl.hit(1, 1, 5).refused == "minute"
    assert rl.hit(2, 9, 1).refused is None
    assert rl.hit(2, 9, 1).refused == "day"
    assert (rl.peek(1, 1, 5).used_rpm, rl.peek(1, 1, 5).used_rpd) == (1, 1)
    assert (rl.peek(2, 9, 1).used_rpm, rl.peek(2, 9, 1).used_rpd) == (1, 1)


def test_unreachable_storage_fails_closed():
    from app.errors import ServiceUnavailable
    from support import free_port
    rl = RateLimiter(f"redis://127.0.0.1:{free_port()}", clock=Clock(T0))
    with pytest.raises(ServiceUnavailable) as info:
        rl.hit(1, 5, 5)
    assert info.value.status == 503 and info.value.code == "ratelimit_unavailable"
    with pytest.raises(ServiceUnavailable):
        rl.peek(1, 5, 5)
    assert rl.check() is False


# --------------------------------------------------------------------------------------------------
# SQLiteStorage
# --------------------------------------------------------------------------------------------------

def test_sqlite_scheme_is_registered_with_limits(uri, tmp_path):
    st = storage_from_string(uri)
    assert isinstance(st, SQLiteStorage)
    assert st.path == str(tmp_path / "ratelimit.db")
    assert st.check()


def test_sqlite_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = SQLiteStorage("sqlite:///sub/rl.db")
    assert st.incr("k", 10) == 1
    assert (tmp_path / "sub" / "rl.db").exists()


def test_sqlite_incr_get_and_clamp(uri):
    st = SQLiteStorage(uri)
    assert st.get("k") == 0
    assert [st.incr("k", 30) for _ in range(3)] == [1, 2, 3]
    assert st.get("k") == 3
    assert st.incr("k", 30, 5) == 8
    assert st.incr("k", 30, -1) == 7
    assert st.incr("k", 30, -100) == 0          # a give-back never goes below zero
    assert st.get("k") == 0
    assert st.incr("k", 30) == 1
    assert st.incr("fresh", 30, -1) == 0        # giving back on a missing counter creates it at zero
    assert st.get("fresh") == 0
    assert st.incr("fresh", 30) == 1
    assert st.get("other") == 0


def test_sqlite_expiry_resets(uri):
    st = SQLiteStorage(uri)
    before = time.time()
    assert st.incr("k", 0.3) == 1
    assert st.incr("k", 100) == 2                # a later hit does not extend the window
    assert before + 0.3 <= st.get_expiry("k") <= time.time() + 0.3
    time.sleep(0.4)
    assert st.get("k") == 0
    assert st.get_expiry("k") == pytest.approx(time.time(), abs=1)
    assert st.incr("k", 0.3, -1) == 0            # a give-back after expiry does not revive the old count
    assert st.get("k") == 0
    assert st.incr("k", 5) == 1


def test_sqlite_purge_clear_reset(uri):
    st = SQLiteStorage(uri, purge_probability=1.0)
    st.incr("old", 0.1)
    time.sleep(0.2)
    st.incr("new", 30)                           # purges expired rows
    with st._conn() as conn:
        assert [r[0] for r in conn.execute("SELECT key FROM ratelimit_counter")] == ["new"]
    st.incr("a", 30)
    st.clear("a")
    assert st.get("a") == 0 and st.get("new") == 1
    assert st.reset() == 1
    assert st.get("new") == 0


def test_sqlite_survives_reopen(uri):
    SQLiteStorage(uri).incr("k", 60, 4)
    assert SQLiteStorage(uri).get("k") == 4


def test_sqlite_rejects_memory_and_missing_paths():
    for bad in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ValueError):
            SQLiteStorage(bad)


def test_sqlite_threads_share_the_pool(uri):
    from concurrent.futures import ThreadPoolExecutor
    st = SQLiteStorage(uri)
    with ThreadPoolExecutor(16) as pool:
        values = list(pool.map(lambda _: st.incr("k", 60), range(400)))
    assert sorted(values) == list(range(1, 401))
    assert st.get("k") == 400


# ---- several processes on one file (gunicorn workers) ------------------------------------------------

PROCS, PER_PROC = 4, 50


def _incr_worker(st: SQLiteStorage, barrier, out) -> None:
    barrier.wait()
    out.put([st.incr("shared", 60) for _ in range(PER_PROC)])


def _admit_worker(st: SQLiteStorage, limit: int, barrier, out) -> None:
    """The admission rule the limiter uses: count, and give back when over the limit."""
    barrier.wait()
    admitted = 0
    for _ in range(PER_PROC):
        if st.incr("admit", 60) <= limit:
            admitted += 1
        else:
            st.incr("admit", 60, -1)
    out.put(admitted)


def _hit_worker(uri: str, t: float, rpm: int, rpd: int, barrier, out) -> None:
    rl = RateLimiter(uri, clock=lambda: t)
    barrier.wait()
    out.put(sum(rl.hit(42, rpm, rpd).refused is None for _ in range(PER_PROC)))


def _open_worker(uri: str, barrier, out) -> None:
    st = SQLiteStorage(uri)
    barrier.wait()
    try:
        out.put(st.incr("k", 60))
    except Exception as err:     # reported, not raised: the parent shows what went wrong
        out.put(repr(err))


def _run(target, *args, procs: int = PROCS) -> list:
    """Fork ``procs`` processes running ``target(*args, barrier, out)``; return what each put on ``out``."""
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    children = [ctx.Process(target=target, args=(*args, barrier, out)) for _ in range(procs)]
    for p in children:
        p.start()
    results = [out.get(timeout=60) for _ in children]
    for p in children:
        p.join(30)
        assert p.exitcode == 0
    return results


def test_sqlite_concurrent_processes_count_exactly(uri):
    st = SQLiteStorage(uri)
    st.incr("warm", 60)          # the parent has pooled connections before the fork; children must not use them
    results = _run(_incr_worker, st)
    values = [v for chunk in results for v in chunk]
    # Every increment is atomic: each process saw distinct counts, together exactly 1..200.
    assert sorted(values) == list(range(1, PROCS * PER_PROC + 1))
    assert st.get("shared") == PROCS * PER_PROC


def test_sqlite_concurrent_admission_admits_exactly_the_limit(uri):
    st = SQLiteStorage(uri)
    limit = 37
    assert sum(_run(_admit_worker, st, limit)) == limit
    assert st.get("admit") == limit          # every refused increment was given back


@pytest.mark.parametrize("rpm, rpd", [(37, 1000), (1000, 37)])
def test_limiter_concurrent_processes_admit_exactly_the_limit(uri, rpm, rpd):
    limit = min(rpm, rpd)
    assert sum(_run(_hit_worker, uri, T0, rpm, rpd)) == limit
    peek = RateLimiter(uri, clock=lambda: T0).peek(42, rpm, rpd)
    assert (peek.used_rpm, peek.used_rpd) == (limit, limit)


def test_sqlite_open_waits_for_another_workers_setup_write(tmp_path):
    # A new file still in rollback-journal mode, with another worker inside a write (as during its CREATE
    # TABLE): SQLite refuses the switch to WAL at once, without the busy handler. Opening must wait, not fail.
    path = tmp_path / "rl.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE unrelated (x)")
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.3, other.execute, ("COMMIT",))
    timer.start()
    try:
        started = time.monotonic()
        st = SQLiteStorage(f"sqlite:///{path}", busy_timeout=5)
        assert st.incr("k", 60) == 1
        assert time.monotonic() - started >= 0.25
    finally:
        timer.join()
        other.close()
    with st._conn() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_open_gives_up_after_the_busy_timeout(tmp_path):
    path = tmp_path / "rl.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE unrelated (x)")
    other.execute("BEGIN IMMEDIATE")
    try:
        st = SQLiteStorage(f"sqlite:///{path}", busy_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            st.incr("k", 60)
        assert 0.25 <= time.monotonic() - started < 3
    finally:
        other.close()


def test_sqlite_fresh_file_opened_by_many_processes_at_once(tmp_path):
    # gunicorn workers meeting their first requests together on a new install: each creates the file, switches
    # it to WAL and creates the table at the same moment. No worker may fail (that would be a 503).
    for n in range(8):
        results = _run(_open_worker, f"sqlite:///{tmp_path / f'fresh{n}.db'}", procs=8)
        assert sorted(results, key=str) == list(range(1, 9)), results
