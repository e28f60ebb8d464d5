"""The router's order of candidates (positions, weights, key pools, fallbacks) and the cool-downs it keeps
on a ``limits`` storage shared by processes."""
from __future__ import annotations

import collections
import email.utils
import time

import pytest
from limits.storage import MemoryStorage

from app.catalog import Model
from app.catalog import Provider
from app.catalog import Route
from app.catalog import Routing
from app.upstream import cooldowns as cd
from app.upstream.client import UpstreamClient
from app.upstream.cooldowns import Cooldowns
from app.upstream.routing import Router
from app.upstream.routing import missing_keys
from app.upstream.routing import retry_after

P = Provider("p", "http://127.0.0.1:9/v1", "P_KEY")
Q = Provider("q", "http://127.0.0.1:9/v2", "Q_A", api_key_envs=("Q_A", "Q_B", "Q_C"))
R = Provider("r", "http://127.0.0.1:9/v3", None)


def model(mid: str, *routes: Route, fallbacks: tuple = ()) -> Model:
    return Model(mid, routes[0].provider, routes[0].upstream_model, "x", routes=routes, fallbacks=fallbacks)


def router() -> Router:
    return Router(UpstreamClient(), Cooldowns(None), Routing())


def test_candidates_follow_positions_keys_and_fallbacks():
    backup = model("backup", Route(R, "r-up"))
    m = model("m", Route(P, "p-up"), Route(Q, "q-up", None, 1), fallbacks=(backup,))
    r = router()
    got = [(c.model.id, c.route.provider.name, c.key_env, c.call_model.upstream_model,
            c.call_model.provider.api_key_env) for c in r.candidates(m)]
    assert got[0] == ("m", "p", "P_KEY", "p-up", "P_KEY")
    assert sorted(g[2] for g in got[1:4]) == ["Q_A", "Q_B", "Q_C"] and {g[3] for g in got[1:4]} == {"q-up"}
    assert got[4] == ("backup", "r", None, "r-up", None)
    # the pool's first key turns from one request to the next, so traffic spreads over the keys
    firsts = collections.Counter(list(r.candidates(m))[1].key_env for _ in range(30))
    assert set(firsts) == {"Q_A", "Q_B", "Q_C"}


def test_routes_of_one_position_share_by_weight():
    m = model("m", Route(P, "heavy", 3, 0), Route(Q, "light", 1, 0))
    r = router()
    firsts = collections.Counter(next(r.candidates(m)).route.upstream_model for _ in range(4000))
    assert 0.70 < firsts["heavy"] / 4000 < 0.80        # 3:1, with room for chance (p of failing ~1e-10)
    assert {c.route.upstream_model for c in r.candidates(m)} == {"heavy", "light"}    # both, always


def test_missing_keys_only_when_every_route_lacks_one(monkeypatch):
    for name in ("P_KEY", "Q_A", "Q_B", "Q_C"):
        monkeypatch.delenv(name, raising=False)
    m = model("m", Route(P, "p"), Route(Q, "q"))
    assert missing_keys(m) == ["P_KEY", "Q_A", "Q_B", "Q_C"]
    monkeypatch.setenv("Q_B", "x")
    assert missing_keys(m) == []
    assert missing_keys(model("n", Route(R, "r"))) == []         # a provider that takes no key


def test_cool_downs_are_shared_through_the_storage_and_cheap_when_idle(monkeypatch):
    storage = MemoryStorage()
    entries = [cd.key_entry("p", "P_KEY"), cd.route_entry("p", "p-up")]
    one, two = Cooldowns(storage, entries), Cooldowns(storage, entries)
    assert one.active() == {} and two.active() == {}
    reads = []
    real_get = storage.get
    monkeypatch.setattr(storage, "get", lambda key: reads.append(key) or real_get(key))
    for _ in range(1000):                         # nothing cooling: no storage read within the refresh interval
        two.active()
    assert reads == []

    until = one.cool(cd.route_entry("p", "p-up"), 30, "HTTP 503")
    assert one.active() == {cd.route_entry("p", "p-up"): until}          # its own failure: at once
    two._next_refresh = 0                          # the refresh interval has passed
    seen = two.active()
    assert list(seen) == [cd.route_entry("p", "p-up")] and abs(seen[cd.route_entry("p", "p-up")] - until) <= 1.5

    # a longer cool-down (an upstream Retry-After) replaces a shorter one, a shorter one never shortens it
    longer = one.cool(cd.route_entry("p", "p-up"), 120)
    assert one.cool(cd.route_entry("p", "p-up"), 5) == longer
    two._next_refresh = 0
    assert two.active()[cd.route_entry("p", "p-up")] >= longer - 1.5


@pytest.mark.parametrize("kind", ["sqlite", "redis", "memcached"])
def test_every_shared_storage_carries_cool_downs_and_their_end(kind, tmp_path):
    """Two processes' views on one storage of each kind the gateway shares counters on."""
    from limits.storage import storage_from_string

    import app.limits.sqlite_storage  # noqa: F401  (registers sqlite://)
    from support import Memcached
    from support import flush_redis

    server = Memcached() if kind == "memcached" else None
    uri = {"sqlite": f"sqlite:///{tmp_path / 'rl.db'}", "redis": flush_redis(14)}.get(kind) or server.uri
    try:
        entry = cd.key_entry("p", "P_KEY")
        one, two = Cooldowns(storage_from_string(uri), [entry]), Cooldowns(storage_from_string(uri), [entry])
        assert two.active() == {}
        until = one.cool(entry, 40, "HTTP 429")
        two._next_refresh = 0
        assert abs(two.active()[entry] - until) <= 1.5
        longer = one.cool(entry, 200)                 # replaces the entry: its expiry is the new end
        two._next_refresh = 0
        assert abs(two.active()[entry] - longer) <= 1.5
    finally:
        if server:
            server.stop()
        if kind == "redis":
            flush_redis(14)


def test_an_unreachable_storage_never_fails_a_request():
    class Broken(MemoryStorage):
        def get(self, key):
            raise ConnectionError("down")

        def incr(self, *a, **kw):
            raise ConnectionError("down")

    c = Cooldowns(Broken(), [cd.key_entry("p", "P_KEY")])
    assert c.active() == {}
    c.cool(cd.key_entry("p", "P_KEY"), 10)
    assert cd.key_entry("p", "P_KEY") in c.active()       # this process still knows


@pytest.mark.parametrize("value, low, high", [
    (None, 0, 0), ("", 0, 0), ("12", 12, 12), ("1.5", 1.5, 1.5), ("-3", 0, 0), ("soon", 0, 0), ("nan", 0, 0),
    ("999999", 3600, 3600), ("in 100 s, as an HTTP date", 90, 101), ("Sun, 06 Nov 1994 08:49:37 GMT", 0, 0),
])
def test_retry_after(value, low, high):
    if value and value.startswith("in 100 s"):             # made now, not when the tests were collected
        value = email.utils.formatdate(time.time() + 100, usegmt=True)
    assert low <= retry_after(value) <= high
