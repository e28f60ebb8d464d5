"""
app.upstream.routing
~~~~~~~~~~~~~~~~~~~~

Which provider call answers a request: routes, key pools, fallback models, retries and cool-downs.

A model's candidates, in order: its routes by position (routes sharing a position in an order drawn by their
weights), each route's pool of keys (the starting key turns from one request to the next), then the same for
each of its ``fallback_models``. :meth:`Router.open` calls them in that order with
:meth:`~app.upstream.client.UpstreamClient.open` and moves on to the next one when a call fails in a way that
another call may not: no connection, no answer's head in time, HTTP 429, 401/403 (the key), 500, 502, 503,
504 or 529; at most ``[routing] attempts`` calls per request. A caller's fault (400, 404, 422...) is returned
at once. Nothing is ever retried after it returns: the relay starts from the answer it gives.

A key that got 429 or 401/403 cools down; a route that failed otherwise cools down (``cooldown_seconds``, or
the provider's ``Retry-After`` when longer): see app/upstream/cooldowns.py. A key whose variable is unset is
never called (a call without the key would only fail, or worse, succeed unauthenticated somewhere).
"""
from __future__ import annotations

import datetime
import email.utils
import itertools
import os
import random
import time
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from typing import Callable
from typing import Iterator

from ..catalog import Catalog
from ..catalog import Model
from ..catalog import Route
from ..catalog import Routing
from ..errors import ServiceUnavailable
from ..errors import UpstreamError
from .client import Response
from .client import UpstreamClient
from .client import close
from .client import reason
from .cooldowns import Cooldowns
from .cooldowns import key_entry
from .cooldowns import route_entry

#: Answers after which another route is tried: the provider is limited or failing, not the request.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
#: Answers that blame the key: the next key of the pool is tried, and this one cools down.
KEY_STATUSES = frozenset({401, 403, 429})

#: The longest upstream ``Retry-After`` honoured, in seconds (a provider's typo must not park a route a day).
MAX_RETRY_AFTER = 3600


@dataclass(frozen=True)
class Candidate:
    """One possible call: the catalogue model that would answer, its route, and one key of the route's pool.

    ``call_model`` is what the client is given: the route's provider with this key, the route's upstream name.
    """

    model: Model
    route: Route
    key_env: str | None
    call_model: Model
    key_entry: str
    route_entry: str


@dataclass
class Answer:
    """Who answered a request (or gave the answer it ends with), and every call it took."""

    candidate: Candidate
    attempts: list[dict] = field(default_factory=list)

    @property
    def model(self) -> Model:
        return self.candidate.model

    @property
    def provider(self) -> str:
        return self.candidate.route.provider.name

    def headers(self) -> dict[str, str]:
        """Who answered: the catalogue model (the one asked for or a fallback), its provider, and the provider's
        name for the model (the route's ``upstream_model``)."""
        return {"X-Boundless-Model": self.model.id, "X-Boundless-Route": self.provider,
                "X-Boundless-Upstream-Model": self.candidate.route.upstream_model}


PayloadFor = Callable[[Model], bytes]


class Router:
    """Opens a model's upstream call through its routes, keys and fallbacks (one per process, in ``State``)."""

    def __init__(self, client: UpstreamClient, cooldowns: Cooldowns, routing: Routing) -> None:
        self.client = client
        self.cooldowns = cooldowns
        self.routing = routing
        #: model id -> its positions, each a list of (route, [candidates per key]); built on first use.
        self._plans: dict[str, list[list[tuple[Route, list[Candidate]]]]] = {}
        self._turn = itertools.count()

    # ------------------------------------------------------------------ order

    def _plan(self, model: Model) -> list[list[tuple[Route, list[Candidate]]]]:
        plan = self._plans.get(model.id)
        if plan is None:
            plan = self._plans[model.id] = plan_of(model)
        return plan

    def candidates(self, model: Model) -> Iterator[Candidate]:
        """Every candidate of ``model`` and then of its fallback models, in the order they are tried."""
        for m in (model, *model.fallbacks):
            for position in self._plan(m):
                for _route, keys in (position if len(position) == 1 else _by_weight(position)):
                    if len(keys) == 1:
                        yield keys[0]
                    else:
                        start = next(self._turn) % len(keys)
                        yield from keys[start:]
                        yield from keys[:start]

    # ------------------------------------------------------------------ calls

    def open(self, model: Model, payload_for: PayloadFor, stream: bool,
             attempts: list[dict] | None = None, path: str | None = None,
             headers: dict | None = None) -> tuple[Response, Answer]:
        """Open the first call that answers usably; return it with who answered and the calls it took.

        A failed answer is returned (unread) when no other call may be made: the caller maps it as any
        provider's answer.

        :raise UpstreamError: the last call could not be made (or timed out) and no other may be made.
        :raise ServiceUnavailable: no call was made: every candidate is cooling down (``Retry-After``), or
            lacks its key variable (named).

        ``attempts`` (given, so that a caller also has them when this raises) gets one entry per call made;
        ``path`` and ``headers`` are the endpoint's (app/upstream/apis.py), as for ``UpstreamClient.open``.
        """
        attempts = [] if attempts is None else attempts
        payloads: dict[str, bytes] = {}
        missing: list[str] = []
        cooling: list[float] = []
        failed: tuple[Response, Answer] | None = None
        last_error: UpstreamError | None = None
        # A model with one route, one key and no fallback (today's catalogue) has nothing to skip to: it is
        # always called, and the provider's own answer (429 with its Retry-After...) is what the caller gets.
        alone = _alone(model)
        for cand in self.candidates(model):
            active = None if alone else self.cooldowns.active()
            if active and (cand.route_entry in active or cand.key_entry in active):
                cooling.append(max(active.get(cand.route_entry, 0.0), active.get(cand.key_entry, 0.0)))
                continue
            if cand.key_env is not None and not os.environ.get(cand.key_env):
                missing.append(cand.key_env)
                continue
            if len(attempts) >= self.routing.attempts:
                break
            if failed is not None:                     # another call will be made: drop the failed answer
                close(failed[0], False)
                failed = None
            payload = payloads.get(cand.route.upstream_model)
            if payload is None:
                payload = payloads[cand.route.upstream_model] = payload_for(cand.call_model)
            t0 = time.perf_counter()
            try:
                resp = self.client.open(cand.call_model, payload, stream, path, headers)
            except UpstreamError as err:
                kind = reason(err.__cause__)[0] if err.__cause__ is not None else "unusable"
                attempts.append(_attempt(cand, kind, t0, None if alone else "route"))
                if not alone:
                    self.cooldowns.cool(cand.route_entry, self.routing.cooldown_seconds, kind)
                last_error = err
                continue
            status = resp.status_code
            if status in KEY_STATUSES or status in RETRY_STATUSES:
                cooled = "key" if status in KEY_STATUSES else "route"
                attempts.append(_attempt(cand, f"http_{status}", t0, None if alone else cooled))
                if not alone:
                    wait = max(self.routing.cooldown_seconds, retry_after(resp.headers.get("Retry-After")))
                    self.cooldowns.cool(cand.key_entry if cooled == "key" else cand.route_entry, wait,
                                        f"HTTP {status}")
                failed, last_error = (resp, Answer(cand, attempts)), None
                continue
            attempts.append(_attempt(cand, f"http_{status}", t0, None))
            self.cooldowns.succeeded(cand.route_entry)
            self.cooldowns.succeeded(cand.key_entry)
            return resp, Answer(cand, attempts)
        if failed is not None:
            return failed
        if last_error is not None:
            raise last_error
        raise _nothing_to_call(model, missing, cooling)


def _alone(model: Model) -> bool:
    """True for a model with a single candidate: one route, at most one key, no fallback model."""
    return not model.fallbacks and len(model.routes) == 1 and len(model.routes[0].provider.api_key_envs) <= 1


def plan_of(model: Model) -> list[list[tuple[Route, list[Candidate]]]]:
    """A model's positions: lists of (route, its candidates, one per key of the provider's pool)."""
    positions: dict[int, list[tuple[Route, list[Candidate]]]] = {}
    for route in model.routes:
        provider = route.provider
        keys = []
        for env in provider.api_key_envs or (None,):
            keyed = replace(provider, api_key_env=env, api_key_envs=(env,) if env else ())
            call_model = replace(model, provider=keyed, upstream_model=route.upstream_model, routes=(),
                                 fallbacks=())
            keys.append(Candidate(model, route, env, call_model, key_entry(provider.name, env),
                                  route_entry(provider.name, route.upstream_model)))
        positions.setdefault(route.group, []).append((route, keys))
    return [positions[g] for g in sorted(positions)]


def _by_weight(position: list[tuple[Route, list[Candidate]]]) -> list[tuple[Route, list[Candidate]]]:
    """The routes of one position in a random order where each comes first in proportion to its weight."""
    rest = list(position)
    out = []
    while rest:
        total = sum(r.weight or 1 for r, _ in rest)
        pick = random.random() * total
        for i, (r, _) in enumerate(rest):
            pick -= r.weight or 1
            if pick < 0 or i == len(rest) - 1:
                out.append(rest.pop(i))
                break
    return out


def _attempt(cand: Candidate, result: str, t0: float, cooled: str | None) -> dict:
    """One call as the log line and the metrics see it (a key's variable name, never the key)."""
    return {"model": cand.model.id, "provider": cand.route.provider.name, "upstream_model": cand.route.upstream_model,
            "key_env": cand.key_env, "result": result, "cooled": cooled,
            "ms": round((time.perf_counter() - t0) * 1000, 1)}


def retry_after(value: str | None) -> float:
    """Seconds of an upstream ``Retry-After`` (seconds or an HTTP date), 0 when absent or unusable."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - time.time()
    if seconds != seconds:                     # NaN
        return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _nothing_to_call(model: Model, missing: list[str], cooling: list[float]) -> ServiceUnavailable:
    if cooling:
        wait = max(1, int(min(cooling) - time.time() + 0.999))
        return ServiceUnavailable(
            f"Every provider route of the model {model.id!r} failed recently and is cooling down; "
            f"try again in {wait}s.", code="upstream_cooling_down", headers={"Retry-After": str(wait)})
    names = ", ".join(dict.fromkeys(missing)) or "?"
    return ServiceUnavailable(
        f"The model {model.id!r} cannot be called: the gateway has no provider key for it ({names} "
        f"{'is' if len(set(missing)) == 1 else 'are'} not set); tell the gateway's operator.",
        code="provider_key_missing")


def missing_keys(model: Model) -> list[str]:
    """The key variables ``model`` lacks when none of its routes has a key set (else empty): such a model
    cannot be called, and is left out of ``/models``."""
    missing = []
    for route in model.routes:
        envs = route.provider.api_key_envs
        if not envs or any(os.environ.get(e) for e in envs):
            return []
        missing.extend(envs)
    return list(dict.fromkeys(missing))


def known_entries(catalog: Catalog) -> list[str]:
    """Every cool-down entry the catalogue can have (what a process reads back from the shared storage)."""
    out: dict[str, None] = {}
    for model in catalog.models.values():
        for route in model.routes:
            out[route_entry(route.provider.name, route.upstream_model)] = None
            for env in route.provider.api_key_envs or (None,):
                out[key_entry(route.provider.name, env)] = None
    return list(out)


def entry_state(cooldowns: Cooldowns, entry: str) -> dict:
    """``{"state": "ok"}``, ``{"state": "cooling_down", "until": ISO time}`` or ``{"state": "failing",
    "error": ...}`` (this process's last call through it failed, and its cool-down is over)."""
    until = cooldowns.active().get(entry)
    if until is not None:
        stamp = datetime.datetime.fromtimestamp(until, datetime.timezone.utc)
        return {"state": "cooling_down", "until": stamp.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "error": cooldowns.last_error.get(entry)}
    error = cooldowns.last_error.get(entry)
    return {"state": "failing", "error": error} if error else {"state": "ok"}


def health(catalog: Catalog, cooldowns: Cooldowns) -> dict:
    """Every provider (its keys by position in the pool) and every model's routes with their state, without
    addresses, key variables or keys."""
    providers = []
    for provider in catalog.providers.values():
        keys = []
        for i, env in enumerate(provider.api_key_envs or (None,)):
            state = entry_state(cooldowns, key_entry(provider.name, env))
            if env is not None and not os.environ.get(env):
                state = {"state": "failing", "error": "key not set"}
            keys.append({"key": i + 1, **state})
        providers.append({"name": provider.name, "keys": keys})
    models = []
    for model in catalog.models.values():
        routes = []
        for route in model.routes:
            state = entry_state(cooldowns, route_entry(route.provider.name, route.upstream_model))
            if state["state"] == "ok":
                key_states = [k for p in providers if p["name"] == route.provider.name for k in p["keys"]]
                if key_states and all(k["state"] == "cooling_down" for k in key_states):
                    state = {"state": "cooling_down", "until": min(k["until"] for k in key_states),
                             "error": "every key is cooling down"}
            routes.append({"provider": route.provider.name, "upstream_model": route.upstream_model,
                           "weight": route.weight, **state})
        models.append({"id": model.id, "routes": routes, "fallback_models": [f.id for f in model.fallbacks]})
    return {"providers": providers, "models": models}
