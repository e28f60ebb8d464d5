"""
app.limits.ratelimit
~~~~~~~~~~~~~~~~~~~~

Per-key request limits: requests per minute (RPM) and per calendar day (RPD), exact across workers and boxes.

Counters live in a ``limits`` storage named by ``BOUNDLESS_RATELIMIT_STORAGE``: our ``sqlite://`` file (one
box, the default), ``memcached://`` or ``redis://`` (several boxes). Windows are fixed and aligned to the clock:
the minute is the wall-clock minute, the day is the calendar day in ``[limits] day_timezone``. Each window is
its own counter key (``boundless/<key id>/m/<minute>``, ``…/d/<date>``), so a window never outlives its time
and a restart never hands out a fresh one.

A hit increments the minute counter, then the day counter, each one atomic increment in the storage. A
refused request gives its increments back, so a 429 never uses up more of either window; at most ``limit``
requests can ever see a count within the limit, so concurrent requests in any number of processes admit
exactly ``limit``.

We use ``limits`` (its storages, our SQLite one registered through its registry) but not Flask-Limiter's
request hooks: those count before the view has validated the body (a 400 must not count), cannot express a
calendar day in a time zone, and cannot give back a hit that a second window refused.
"""
from __future__ import annotations

import datetime
import logging
import math
import time
import zoneinfo
from dataclasses import dataclass
from typing import Callable

from limits.storage import MemcachedStorage
from limits.storage import MemoryStorage
from limits.storage import Storage
from limits.storage import storage_from_string

from .sqlite_storage import SQLiteStorage   # importing it registers the sqlite:// scheme with limits
from ..errors import ConfigurationError
from ..errors import RateLimited
from ..errors import ServiceUnavailable
from ..text import plural

log = logging.getLogger("boundless")


@dataclass(frozen=True)
class Decision:
    """The state of a key's two windows after (or without) a hit. A limit of None is a window the key has no
    limit in (``boundless keys ... --rpm none``): nothing is counted there and no header speaks of it."""

    rpm: int | None
    rpd: int | None
    used_rpm: int
    used_rpd: int
    reset_rpm: float        # seconds until the minute window reopens
    reset_rpd: float        # seconds until the next midnight in the configured zone
    refused: str | None = None   # "minute" | "day" | None

    @property
    def remaining_rpm(self) -> int | None:
        return None if self.rpm is None else max(0, self.rpm - self.used_rpm)

    @property
    def remaining_rpd(self) -> int | None:
        return None if self.rpd is None else max(0, self.rpd - self.used_rpd)

    def headers(self) -> dict[str, str]:
        """Our two headers, plus OpenAI's ``x-ratelimit-*-requests`` for the tighter window; a window without
        a limit has no header (and a key without any limit gets none)."""
        out = {}
        if self.rpm is not None:
            out["X-RateLimit-Remaining-RPM"] = str(self.remaining_rpm)
        if self.rpd is not None:
            out["X-RateLimit-Remaining-RPD"] = str(self.remaining_rpd)
        if not out:
            return out
        tight_day = self.rpm is None or (self.refused == "day") or (
            self.refused is None and self.rpd is not None and self.remaining_rpd < self.remaining_rpm)
        limit, remaining, reset = ((self.rpd, self.remaining_rpd, self.reset_rpd) if tight_day
                                   else (self.rpm, self.remaining_rpm, self.reset_rpm))
        out.update({
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": duration(reset),
        })
        return out

    def error(self) -> RateLimited:
        if self.refused == "day":
            retry = retry_after(self.reset_rpd)
            msg = (f"Rate limit reached: {plural(self.rpd, 'request')} per day for this key. The daily window "
                   f"reopens at midnight, in {duration(retry)} (Retry-After: {retry}).")
            extra = {"x-should-retry": "false"}
        else:
            retry = retry_after(self.reset_rpm)
            msg = (f"Rate limit reached: {plural(self.rpm, 'request')} per minute for this key. "
                   f"Try again in {retry}s.")
            extra = {}
        return RateLimited(msg, headers={**self.headers(), "Retry-After": str(retry), **extra})


def retry_after(seconds: float) -> int:
    """Whole seconds until a window reopens: never 0, never past the reopening (the window edge rounds up)."""
    return max(1, math.ceil(seconds))


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``"6h2m5s"``, ``"1m0s"``, ``"12s"``, ``"250ms"``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


class RateLimiter:
    """Counts each key's requests in its minute and day windows on a shared ``limits`` storage."""

    def __init__(self, storage_uri: str, day_timezone: str = "UTC",
                 clock: Callable[[], float] = time.time) -> None:
        try:
            self.storage: Storage = storage_from_string(storage_uri)
        except Exception as err:  # limits raises ConfigurationError or ValueError depending on the backend
            raise ConfigurationError(f"BOUNDLESS_RATELIMIT_STORAGE={storage_uri!r}: {err}") from err
        self.uri = storage_uri
        self.tz = zoneinfo.ZoneInfo(day_timezone)
        self.clock = clock
        self._today: tuple[str, float, float] | None = None
        self._memcached = isinstance(self.storage, MemcachedStorage)
        self._pair = isinstance(self.storage, SQLiteStorage)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.storage, MemoryStorage)

    def _day(self, now: float) -> tuple[str, float, float]:
        """(date, start, end) of the local day holding ``now``: worked out with the zone's rules once a day,
        not per request (~6 µs each), and anew whenever ``now`` is outside the kept day (also backwards)."""
        day = self._today
        if day is None or not day[1] <= now < day[2]:
            date = datetime.datetime.fromtimestamp(now, self.tz).date()
            start = datetime.datetime.combine(date, datetime.time(), tzinfo=self.tz)
            end = datetime.datetime.combine(date + datetime.timedelta(days=1), datetime.time(), tzinfo=self.tz)
            day = self._today = (date.isoformat(), start.timestamp(), end.timestamp())
        return day

    def _windows(self, key_id: int) -> tuple[str, str, float, float]:
        now = self.clock()
        date, _, midnight = self._day(now)
        minute = int(now // 60)
        return (f"boundless/{key_id}/m/{minute}", f"boundless/{key_id}/d/{date}",
                60 - (now - minute * 60), midnight - now)

    def _incr(self, key: str, expiry: float) -> int:
        if self._memcached:    # we never read memcached expiries, so skip limits' extra "/expires" write
            return self.storage.incr(key, math.ceil(expiry), 1, set_expiration_key=False)
        return self.storage.incr(key, math.ceil(expiry))

    def _give_back(self, key: str, expiry: float) -> None:
        if self._memcached:
            self.storage.storage.decr(key, 1, noreply=False)
        elif isinstance(self.storage, MemoryStorage):
            self.storage.decr(key, 1)
        else:                  # sqlite (clamped at 0) and redis (INCRBY -1 on an existing key)
            self.storage.incr(key, math.ceil(expiry), -1)

    def count_up(self, key: str, expiry: float) -> int:
        """One atomic increment of any counter on this storage (``expiry`` seconds if it is new); the new count.
        For the other per-key counters (app/limits/parallel.py); storage errors are the caller's to translate."""
        return self._incr(key, expiry)

    def count_down(self, key: str, expiry: float) -> None:
        """Take one back from a counter that exists (see :meth:`_give_back`)."""
        self._give_back(key, expiry)

    def hit(self, key_id: int, rpm: int | None, rpd: int | None) -> Decision:
        """Count one request; return the decision (``refused`` set, and nothing counted, when over a limit).

        A limit of None is a window without a limit: it is neither counted nor checked.
        :raise ServiceUnavailable: the storage is unreachable (we fail closed rather than run unlimited).
        """
        m_key, d_key, m_reset, d_reset = self._windows(key_id)
        m_exp, d_exp = m_reset + 5, d_reset + 3600     # counters expire a little after their window
        if rpm is None or rpd is None:
            return self._hit_some(m_key, d_key, m_reset, d_reset, rpm, rpd)
        if self._pair:                                 # our SQLite storage: both windows in one transaction
            try:
                used_m, used_d = self.storage.hit_pair((m_key, math.ceil(m_exp), rpm), (d_key, math.ceil(d_exp), rpd))
                if used_m > rpm:
                    return Decision(rpm, rpd, rpm, self.storage.get(d_key), m_reset, d_reset, refused="minute")
            except Exception as err:
                raise self.unavailable(err) from err
            if used_d > rpd:
                return Decision(rpm, rpd, used_m - 1, rpd, m_reset, d_reset, refused="day")
            return Decision(rpm, rpd, used_m, used_d, m_reset, d_reset)
        try:
            used_m = self._incr(m_key, m_exp)
            if used_m > rpm:
                self._give_back(m_key, m_exp)
                return Decision(rpm, rpd, rpm, self.storage.get(d_key), m_reset, d_reset, refused="minute")
            used_d = self._incr(d_key, d_exp)
            if used_d > rpd:
                self._give_back(d_key, d_exp)
                self._give_back(m_key, m_exp)
                return Decision(rpm, rpd, used_m - 1, rpd, m_reset, d_reset, refused="day")
        except Exception as err:
            raise self.unavailable(err) from err
        return Decision(rpm, rpd, used_m, used_d, m_reset, d_reset)

    def _hit_some(self, m_key: str, d_key: str, m_reset: float, d_reset: float, rpm: int | None,
                  rpd: int | None) -> Decision:
        """A hit on a key with no limit in one window or both: only the limited windows are counted."""
        m_exp, d_exp = m_reset + 5, d_reset + 3600
        used_m = used_d = 0
        try:
            if rpm is not None:
                used_m = self._incr(m_key, m_exp)
                if used_m > rpm:
                    self._give_back(m_key, m_exp)
                    return Decision(rpm, rpd, rpm, 0, m_reset, d_reset, refused="minute")
            if rpd is not None:
                used_d = self._incr(d_key, d_exp)
                if used_d > rpd:
                    self._give_back(d_key, d_exp)
                    if rpm is not None:
                        self._give_back(m_key, m_exp)
                    return Decision(rpm, rpd, max(0, used_m - 1), rpd, m_reset, d_reset, refused="day")
        except Exception as err:
            raise self.unavailable(err) from err
        return Decision(rpm, rpd, used_m, used_d, m_reset, d_reset)

    def peek(self, key_id: int, rpm: int | None, rpd: int | None) -> Decision:
        """The state of a key's windows without counting anything (a window without a limit is not read)."""
        m_key, d_key, m_reset, d_reset = self._windows(key_id)
        try:
            return Decision(rpm, rpd, self.storage.get(m_key) if rpm is not None else 0,
                            self.storage.get(d_key) if rpd is not None else 0, m_reset, d_reset)
        except Exception as err:
            raise self.unavailable(err) from err

    def check(self) -> bool:
        try:
            return bool(self.storage.check())
        except Exception:
            return False

    def unavailable(self, err: Exception) -> ServiceUnavailable:
        """The 503 for a failure of the storage (logged here): the limiter fails closed, and so do the parallel
        slots (app/limits/parallel.py) that count on it."""
        log.error("rate-limit storage %s failed: %s", self.storage.__class__.__name__, err)
        return ServiceUnavailable("The rate-limit storage is unavailable, so requests are refused rather than "
                                  "let through unlimited; try again shortly.", code="ratelimit_unavailable")
