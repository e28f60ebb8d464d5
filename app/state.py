"""
app.state
~~~~~~~~~

What one gateway app holds for the life of the process, built once by ``create_app`` and kept in
``app.extensions["boundless"]`` (never in module globals).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from dataclasses import field
from typing import Callable

from flask import current_app

from .catalog import Catalog
from .keys import KeyCache
from .keys import effective_limit
from .limits.parallel import ParallelSlots
from .limits.ratelimit import RateLimiter
from .upstream.streams import OpenStreams
from .upstream.client import UpstreamClient
from .upstream.routing import Router


@dataclass
class State:
    catalog: Catalog
    limiter: RateLimiter
    keys: KeyCache
    upstream: UpstreamClient
    #: Routes, key pools, fallbacks and cool-downs around ``upstream`` (app/upstream/routing.py).
    router: Router
    streams: OpenStreams = field(default_factory=OpenStreams)
    #: Called once per finished chat request with (lease, outcome): logs and metrics hook in here.
    finish_hooks: list[Callable] = field(default_factory=list)
    #: The keys' parallel slots (``--max-parallel``), on the limiter's storage.
    parallel: ParallelSlots | None = None

    def __post_init__(self) -> None:
        if self.parallel is None:
            self.parallel = ParallelSlots(self.limiter)

    @property
    def budget_tz(self) -> datetime.tzinfo:
        """``[limits] day_timezone``: where the budgets' calendar periods begin (as the daily window's)."""
        return self.limiter.tz

    def finish(self, lease, outcome) -> None:
        for hook in self.finish_hooks:
            hook(lease, outcome)

    def limits_for(self, key) -> tuple[int | None, int | None]:
        """The key's (rpm, rpd): its own or the catalogue's; None for a window it has no limit in."""
        d = self.catalog.limits
        return effective_limit(key.rpm, d.rpm), effective_limit(key.rpd, d.rpd)


def state() -> State:
    return current_app.extensions["boundless"]
