"""
app.server.workertune
~~~~~~~~~~~~~~~~~~~~~

Per-request work in gunicorn itself that a worker can do once, installed by :func:`install` from
``post_worker_init`` (after the fork, in each worker):

* **Settings read once.** gunicorn reads its settings through ``Config.__getattr__`` (a method call and a
  ``Setting.get()`` each), a few dozen times per request: parsing (limits, header rules), the WSGI environ,
  hooks, keep-alive. A worker's settings never change during its life (a reload starts new workers), so the
  worker gets a snapshot whose settings are plain attributes; anything else (the ``Config`` properties such as
  ``is_ssl``) is read from the real ``Config``, as before.
* **The Date header made once per second.** gunicorn formats it through ``email.utils.formatdate`` for every
  response; its value only changes once a second.

In the JSON profile these were 3.9 % of a worker's CPU (docs/benchmarks.md).
"""
from __future__ import annotations

import time


class FrozenConfig:
    """A gunicorn ``Config``'s settings as attributes, read once; everything else from the ``Config``."""

    def __init__(self, cfg) -> None:
        self._cfg = cfg
        for name in cfg.settings:
            self.__dict__[name] = getattr(cfg, name)

    def __getattr__(self, name: str):
        return getattr(self._cfg, name)


def cached_http_date(original):
    """``original`` (gunicorn's ``http_date``) with the current second's value kept: same text, made once."""
    last = [-1, ""]

    def http_date(timestamp=None) -> str:
        if timestamp is not None:
            return original(timestamp)
        now = int(time.time())
        if last[0] != now:
            last[1], last[0] = original(now), now
        return last[1]

    http_date.original = original          # type: ignore[attr-defined]
    return http_date


def install(worker) -> None:
    """Give ``worker`` its settings snapshot and gunicorn its cached Date (idempotent)."""
    from gunicorn import util
    if not isinstance(worker.cfg, FrozenConfig):
        worker.cfg = FrozenConfig(worker.cfg)
    if not hasattr(util.http_date, "original"):
        util.http_date = cached_http_date(util.http_date)
