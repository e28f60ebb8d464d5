"""
app.server.metrics
~~~~~~~~~~~~~~~~~~

``GET /metrics``: Prometheus text format, summed over every gunicorn worker.

Under gunicorn the metrics run in prometheus-client's multiprocess mode: gunicorn.conf.py empties a directory
at start and exports it as ``PROMETHEUS_MULTIPROC_DIR`` before the workers fork; each worker writes its values
to its own files there, and a scrape (in whichever worker gets it) adds them all up. Without that variable
(the app created in-process) the metrics live in a plain per-app registry.

Each request is counted once (see app/server/reporting.py): in the finish hook for chat requests that reached the
upstream, at the end of the request for everything else. Labels stay small and bounded: the route is the URL
rule, the model is a catalogue id or empty, the status is the HTTP status.

``BOUNDLESS_METRICS_TOKEN``, when set, must come as ``Authorization: Bearer <token>``.
"""
from __future__ import annotations

import hmac
import logging
import os

from flask import Flask
from flask import Response
from flask import current_app
from flask import request
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import generate_latest
from prometheus_client import values

from . import reporting
from ..accounting.credits import MICRO
from ..errors import AuthenticationError

log = logging.getLogger("boundless")

_EXT = "boundless_metrics"

#: Whole-request latency of a chat request, in seconds: LLM answers take from a second to many minutes.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
#: Time to the first byte (first event of a stream, headers of a non-stream answer), in seconds.
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

#: Outcomes that are the provider's failure (client_closed and complete are not).
UPSTREAM_FAILURES = {"upstream_cut", "upstream_timeout", "upstream_error", "upstream_unreachable"}


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The gateway's metric families, registered on ``registry`` (None in multiprocess mode: files instead)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry
        self._children: dict[tuple, object] = {}
        kw = {"registry": registry}
        self.requests = Counter(
            "boundless_requests", "HTTP requests by route, method, model and the status the caller got.",
            ["route", "method", "model", "status"], **kw)
        self.latency = Histogram(
            "boundless_chat_latency_seconds", "Chat request duration, from arrival to the last byte relayed.",
            ["model", "stream"], buckets=LATENCY_BUCKETS, **kw)
        self.ttfb = Histogram(
            "boundless_chat_ttfb_seconds", "Chat time to first byte from the provider (first event of a stream).",
            ["model", "stream"], buckets=TTFB_BUCKETS, **kw)
        self.upstream_errors = Counter(
            "boundless_upstream_errors", "Provider failures by provider and kind (the request's outcome).",
            ["provider", "kind"], **kw)
        self.prompt_tokens = Counter(
            "boundless_prompt_tokens", "Prompt tokens charged (reported or estimated) by model.", ["model"], **kw)
        self.completion_tokens = Counter(
            "boundless_completion_tokens", "Completion tokens charged (reported or estimated) by model.",
            ["model"], **kw)
        self.credits = Counter(
            "boundless_credits_charged", "Credits charged by model (computed from the usage at the model's prices).",
            ["model"], **kw)
        self.open_streams = Gauge(
            "boundless_open_streams", "Streams being relayed right now (all live workers).",
            multiprocess_mode="livesum", **kw)
        self.ratelimit_refusals = Counter(
            "boundless_ratelimit_refusals", "Requests refused with 429 by the key's limits, by window.",
            ["window"], **kw)
        self.credit_refusals = Counter(
            "boundless_credit_refusals", "Requests refused with 402 (insufficient credit) by model.",
            ["model"], **kw)
        # Per upstream call (app/upstream/routing.py): labels are catalogue names and failure kinds, bounded.
        self.calls = Counter(
            "boundless_upstream_calls", "Upstream calls by provider and route (upstream model).",
            ["provider", "upstream_model"], **kw)
        self.call_failures = Counter(
            "boundless_upstream_call_failures", "Upstream calls that failed, by provider, route and reason "
            "(http_<status> or the transport failure's kind).", ["provider", "upstream_model", "reason"], **kw)
        self.retries = Counter(
            "boundless_upstream_retries", "Upstream calls made because an earlier call of the request failed, "
            "by the provider and route they went to.", ["provider", "upstream_model"], **kw)
        self.cooldowns = Counter(
            "boundless_upstream_cooldowns", "Cool-downs started, by provider and what cooled down (key or route).",
            ["provider", "kind"], **kw)

    def _child(self, family, *labels: str):
        """``family.labels(*labels)``, looked up once per label set: prometheus-client checks and locks on
        every ``labels()`` call (~4 µs; a chat request makes six). The label sets are bounded (see above)."""
        key = (family, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def record(self, rep: reporting.Report) -> None:
        child = self._child
        model = rep.model or ""
        child(self.requests, rep.route, rep.method, model, str(rep.status)).inc()
        if rep.refused in ("minute", "day"):
            child(self.ratelimit_refusals, rep.refused).inc()
        elif rep.refused == "credit":
            child(self.credit_refusals, model).inc()
        if rep.outcome is None:
            return
        stream = "true" if rep.stream else "false"
        if rep.latency_ms is not None:
            child(self.latency, model, stream).observe(rep.latency_ms / 1000)
        if rep.ttfb_ms is not None:
            child(self.ttfb, model, stream).observe(rep.ttfb_ms / 1000)
        if rep.prompt_tokens:
            child(self.prompt_tokens, model).inc(rep.prompt_tokens)
        if rep.completion_tokens:
            child(self.completion_tokens, model).inc(rep.completion_tokens)
        if rep.charge:
            child(self.credits, model).inc(rep.charge / MICRO)
        if rep.outcome in UPSTREAM_FAILURES:
            child(self.upstream_errors, rep.provider or "", rep.outcome).inc()
        if rep.attempts:
            self._record_calls(rep.attempts)

    def _record_calls(self, attempts: list[dict]) -> None:
        child = self._child
        for i, call in enumerate(attempts):
            provider, route = call["provider"], call["upstream_model"]
            child(self.calls, provider, route).inc()
            if i:
                child(self.retries, provider, route).inc()
            if not call["result"].startswith("http_2"):
                child(self.call_failures, provider, route, call["result"]).inc()
            if call["cooled"]:
                child(self.cooldowns, provider, call["cooled"]).inc()


def _ensure_multiprocess_values() -> None:
    """Values must be mmap-backed when PROMETHEUS_MULTIPROC_DIR is set. prometheus-client decides that when it
    is first imported; if that happened before the variable was set, decide again (nothing was created yet)."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        log.warning("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set; "
                    "switching to multiprocess values")
        values.ValueClass = values.MultiProcessValue()


def init_app(app: Flask) -> None:
    """Create the metrics, hook them to the request reports and the open streams, add ``GET /metrics``."""
    mp_dir = multiprocess_dir()
    if mp_dir:
        _ensure_multiprocess_values()
        metrics = Metrics(None)
    else:
        metrics = Metrics(CollectorRegistry(auto_describe=True))
    app.extensions[_EXT] = metrics
    reporting.subscribe(app, metrics.record)
    app.extensions["boundless"].streams.listeners.append(metrics.open_streams.inc)
    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])


def metrics_view() -> Response:
    token = str(current_app.config.get("BOUNDLESS_METRICS_TOKEN") or "")
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise AuthenticationError("GET /metrics needs 'Authorization: Bearer <metrics token>' "
                                      "(BOUNDLESS_METRICS_TOKEN).", code="invalid_metrics_token",
                                      headers={"WWW-Authenticate": "Bearer"})
    metrics: Metrics = current_app.extensions[_EXT]
    if metrics.registry is None:
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = metrics.registry
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                        "Cache-Control": "no-store"})
