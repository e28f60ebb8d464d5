"""
app.server.logs
~~~~~~~~~~~~~~~

Structured logs on stderr, one JSON object per line.

* ``boundless.access``: one line per request (``BOUNDLESS_LOG_REQUESTS``, default on), reported once by
  app/server/reporting.py: chat requests that reached the upstream from the finish hook (status 200 for a stream
  that started), every other request when it ends. It carries the key's name and display prefix, never the
  key, and nothing of the provider's credentials.
* ``boundless`` (everything else the gateway logs, tracebacks of unexpected errors included): gunicorn does not
  configure Python logging, so unless the operator did, a handler writing the same JSON lines to stderr is
  added here; a line logged during a request carries its ``request_id``.

Example access line (one line; wrapped here)::

    {"ts":"2026-11-25T20:54:14.722Z","level":"info","logger":"boundless.access",
     "request_id":"req_51289d9a7f314e11b7dc8de5ade58119","method":"POST","path":"/api/v1/chat/completions",
     "status":200,"key_name":"alice","key_prefix":"sk-QCXJs","model":"paid-model","stream":true,
     "upstream_status":200,"prompt_tokens":5,"completion_tokens":5,"charge":"0.015","estimated":false,
     "latency_ms":263.2,"ttfb_ms":12.1,"outcome":"complete","refused":null,"remote_addr":"127.0.0.1",
     "answered_model":"paid-model","provider":"mock","attempts":[{"model":"paid-model","provider":"mock",
     "upstream_model":"mock-paid","key_env":"MOCK_KEY","result":"http_200","cooled":null,"ms":11.8}]}

``charge`` is an exact decimal string of credits. ``outcome``, ``upstream_status``, the tokens and the charge
are null for requests that never reached the upstream; ``refused`` is "minute" / "day" (429 of the key's
limits) or "credit" (402). The path never includes the query string. ``attempts`` lists every upstream call
of the request (routes, keys of a pool, fallback models: app/upstream/routing.py) with its result (``http_<status>``
or the transport failure's kind) and what it cooled down (``key``, ``route`` or null); ``provider`` and
``answered_model`` say who answered.
"""
from __future__ import annotations

import datetime
import json
import logging
import sys

import orjson
from flask import Flask
from flask import g
from flask import has_request_context

from . import reporting
from ..accounting.credits import MICRO

ACCESS_LOGGER = "boundless.access"


def iso_utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def credits_str(micro: int | None) -> str | None:
    """Micro-credits as an exact decimal string of credits: 16000 -> "0.016", 0 -> "0"."""
    if micro is None:
        return None
    whole, frac = divmod(int(micro), MICRO)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".")


def _dumps(obj: dict) -> str:
    """One compact JSON line (orjson: a few µs less per request than ``json``; non-ASCII stays UTF-8)."""
    try:
        return orjson.dumps(obj, default=str).decode()
    except TypeError:                 # an integer beyond 64 bits in some logged value
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line: ts, level, logger, message (+ request_id, traceback when there are)."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "boundless_access", False):      # an access line is already its JSON object
            return record.getMessage()
        obj = {"ts": iso_utc(record.created), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        if has_request_context() and g.get("request_id"):
            obj["request_id"] = g.request_id
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["traceback"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return _dumps(obj)


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._boundless = True                # type: ignore[attr-defined]  (added once per process)
    return handler


def access_line(rep: reporting.Report) -> str:
    return _dumps({
        "ts": iso_utc(rep.ts), "level": "info", "logger": ACCESS_LOGGER,
        "request_id": rep.request_id, "method": rep.method, "path": rep.path, "status": rep.status,
        "key_name": rep.key_name, "key_prefix": rep.key_prefix, "model": rep.model, "stream": rep.stream,
        "upstream_status": rep.upstream_status, "prompt_tokens": rep.prompt_tokens,
        "completion_tokens": rep.completion_tokens, "charge": credits_str(rep.charge), "estimated": rep.estimated,
        "latency_ms": rep.latency_ms, "ttfb_ms": rep.ttfb_ms, "outcome": rep.outcome, "refused": rep.refused,
        "remote_addr": rep.remote_addr, "answered_model": rep.answered_model, "provider": rep.provider,
        "attempts": rep.attempts,
    })


def configure_logging() -> logging.Logger:
    """Give ``boundless`` and ``boundless.access`` a JSON stderr handler unless someone configured them."""
    base = logging.getLogger("boundless")
    if not base.handlers and not logging.getLogger().handlers:
        base.addHandler(_stderr_handler())
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        access.addHandler(_stderr_handler())
        access.propagate = False             # one line, not one more through "boundless"
    access.setLevel(logging.INFO)
    return access


def init_app(app: Flask) -> None:
    access = configure_logging()
    if not app.config.get("BOUNDLESS_LOG_REQUESTS", True):
        return

    def log_request(rep: reporting.Report) -> None:
        if access.isEnabledFor(logging.INFO):
            access.info(access_line(rep), extra={"boundless_access": True})

    reporting.subscribe(app, log_request)
