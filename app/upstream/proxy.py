"""
app.upstream.proxy
~~~~~~~~~~~~~~~~~~

Forward one request to its provider and relay the answer: upstream → relay → settle, for every API the
gateway serves (chat completions, embeddings, Responses, Anthropic Messages: :mod:`app.upstream.apis` says
what differs between them).

The request body is rewritten only where it must be (``model`` becomes the upstream name; chat streams always
ask for usage); the answer goes back byte for byte but for its ``model`` value, which names the catalogue id
the caller asked for (:mod:`app.upstream.rename`). Settlement and the finish hook run exactly once per request,
whether it ends normally, on an upstream failure, or when the caller hangs up (WSGI closes the body iterator,
which raises ``GeneratorExit`` at the stream's ``yield``). The stream generator receives everything it needs
as arguments and never touches ``flask.g`` or ``request``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable
from typing import Iterator

from ..accounting import billing
from ..accounting.billing import Lease
from ..accounting.billing import Outcome
from ..catalog import Model
from ..errors import GatewayError
from ..errors import InvalidRequest
from ..errors import RateLimited
from ..errors import ServiceUnavailable
from ..errors import UpstreamError
from ..errors import UpstreamTimeout
from ..jsonio import loads
from .apis import Api
from .rename import ModelName
from .sse import EventRelay
from .streams import OpenStreams
from .client import Response
from .client import UpstreamClient
from .client import close
from .client import iter_raw
from .client import reason
from .routing import Answer
from .routing import Router

log = logging.getLogger("boundless")

#: Upstream 4xx answers that are the caller's fault and pass through with their status.
CALLER_FAULTS = {400, 409, 413, 415, 422}

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON_HEADERS = {"Content-Type": "application/json"}

Finish = Callable[[Lease, Outcome], None]


def upstream_failure(resp: Response, body: bytes, model: Model,
                     api: Api) -> GatewayError | tuple[bytes, int, dict]:
    """Map a non-2xx upstream answer to what the caller gets (see the README's error table)."""
    status = resp.status_code
    provider = model.provider.name
    secret = model.provider.api_key()
    if secret:
        body = body.replace(secret.encode(), b"***")
    shaped = api.error_shaped(body)
    if status in CALLER_FAULTS:
        if shaped:
            return body, status, dict(JSON_HEADERS)
        return InvalidRequest(f"The provider {provider!r} rejected the request (HTTP {status}).", status=status)
    if status == 429:
        retry = resp.headers.get("Retry-After")
        headers = {"Retry-After": retry} if retry else {}
        return RateLimited(f"The provider {provider!r} is rate-limiting the gateway; try again shortly.",
                           code="upstream_rate_limited", headers=headers)
    if status in (401, 403):
        return UpstreamError(f"The provider {provider!r} refused the gateway's credentials (HTTP {status}); "
                             f"tell the gateway's operator.")
    if status == 504:
        return UpstreamTimeout(f"The provider {provider!r} timed out (HTTP 504).")
    return UpstreamError(f"The provider {provider!r} failed (HTTP {status}).")


def forward(client: UpstreamClient, model: Model, body: dict, lease: Lease, started: float,
            finish: Finish, streams: OpenStreams, client_socket, api: Api, caller_headers, router: Router
            ) -> tuple[Iterator[bytes] | bytes, int, dict]:
    """Send the request upstream; return (body or stream of bytes, status, headers) for the caller.

    ``router`` picks the route, key and fallback model that answer, retrying before the relay starts
    (app/upstream/routing.py). Failures before anything was relayed raise a :class:`GatewayError` after
    settling the lease (at no cost).

    :param api: the provider API of the call.
    :param caller_headers: the caller's request headers (a mapping read with ``.get``), of which ``api`` forwards
        its own few.
    """
    stream = lease.stream
    outcome = Outcome()
    what = api.answer
    try:
        resp, answer = _open(router, model, body, lease, outcome, api, caller_headers)
    except GatewayError as err:
        _finish(lease, outcome, "no_route" if err.status == 503 else "upstream_unreachable", started, finish)
        raise err
    model = answer.candidate.call_model          # what answered: its provider (and key), its upstream name
    provider = model.provider.name
    outcome.status = status = resp.status_code
    outcome.ttfb_ms = (time.perf_counter() - started) * 1000

    if status != 200 and (status < 400 or status > 599):         # 1xx, 204, 3xx...: not a chat completion
        close(resp, False)
        _finish(lease, outcome, "upstream_error", started, finish)
        raise _unusable(provider, f"HTTP {status} where {what} was expected")
    if stream and status == 200 and not _is_event_stream(resp):
        close(resp, False)
        _finish(lease, outcome, "upstream_error", started, finish)
        raise _unusable(provider, f"{_media_type(resp)!r} where an event stream was expected")
    if status >= 400 or not stream:
        try:
            data = client.read_body(resp, provider)
        except GatewayError:
            _finish(lease, outcome, "upstream_cut", started, finish)
            raise
        if status >= 400:
            _finish(lease, outcome, "upstream_error", started, finish)
            mapped = upstream_failure(resp, data, model, api)
            if isinstance(mapped, GatewayError):
                raise mapped
            return mapped
        answer = _json_object(data)
        if answer is None:                       # an HTML page, an empty or truncated body...: nothing to charge
            _finish(lease, outcome, "upstream_error", started, finish)
            raise _unusable(provider, f"{_media_type(resp)!r} that is not a JSON object where {what} "
                                      f"was expected")
        outcome.produced = True
        usage = answer.get("usage")
        outcome.usage = api.reader(usage) if isinstance(usage, dict) else None
        _finish(lease, outcome, "complete", started, finish)
        return ModelName(model.id).answer(data, answer), 200, dict(JSON_HEADERS)

    streams.add(resp, client_socket)
    return (relay_stream(resp, lease, outcome, provider, api.relay(body, model), started, finish, streams, api),
            200, {**STREAM_HEADERS, "Content-Type": "text/event-stream; charset=utf-8"})


def _open(router: Router, model: Model, body: dict, lease: Lease, outcome: Outcome, api: Api,
          caller_headers) -> tuple[Response, Answer]:
    """Open the upstream call (through the router's routes, keys and fallbacks); note on ``outcome`` who
    answered and every call it took, and on the lease's context the ``X-Boundless-*`` headers for the caller
    (added to whatever the caller gets, by the view's blueprint)."""
    stream = lease.stream
    attempts = outcome.attempts
    try:
        payload_for = lambda m: api.payload(body, m, stream)     # noqa: E731 (each route's upstream name)
        headers = api.headers(caller_headers)
        resp, answer = router.open(model, payload_for, stream, attempts, api.path, headers)
    except GatewayError:
        if attempts:
            outcome.provider = attempts[-1]["provider"]
            lease.context["route_headers"] = {"X-Boundless-Model": attempts[-1]["model"],
                                              "X-Boundless-Route": attempts[-1]["provider"]}
        raise
    outcome.model, outcome.provider = answer.model, answer.provider      # (router.open filled ``attempts``)
    lease.context["route_headers"] = answer.headers()
    return resp, answer


def _unusable(provider: str, what: str) -> UpstreamError:
    log.warning("upstream %s answered unusably: %s", provider, what)
    return UpstreamError(f"The provider {provider!r} sent an unusable answer: {what}.")


def _media_type(resp: Response) -> str:
    return resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()[:60] or "no Content-Type"


def _is_event_stream(resp: Response) -> bool:
    """A stream's answer is SSE; one without a Content-Type is given the benefit of the doubt (its events
    are checked as they come, and a stream that never says [DONE] is a cut)."""
    kind = _media_type(resp)
    return kind in ("text/event-stream", "no Content-Type")


def _json_object(data: bytes) -> dict | None:
    try:
        obj = loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def relay_stream(resp: Response, lease: Lease, outcome: Outcome, provider: str, relay: EventRelay,
                 started: float, finish: Finish, streams: OpenStreams, api: Api) -> Iterator[bytes]:
    """Yield the upstream's events as they arrive; settle in ``finally`` however the stream ends.

    A stream whose usage has arrived is settled just before its ``[DONE]`` goes out, not after: the OpenAI
    SDKs stop reading at ``[DONE]``, so a caller that then asks for its balance (``GET /api/v1/key``) must
    already see the charge. The end of the stream then only reports it. The other APIs' streams end with their
    own last event (``response.completed``, ``message_stop``), settled the same way.
    """
    pending = 0
    first = True
    status = "complete"
    settled_at_done = False
    try:
        try:
            for chunk in iter_raw(resp, provider):
                outcome.produced = True
                out, content = relay.feed(chunk)
                if out:
                    if first:
                        outcome.ttfb_ms, first = (time.perf_counter() - started) * 1000, False
                    if relay.done and relay.usage is not None and not settled_at_done:
                        outcome.usage, settled_at_done = api.reader(relay.usage), True
                        _settle(lease, outcome, "complete", started)
                    pending = content
                    yield out
                    outcome.delivered_events += pending
                    pending = 0
            tail = relay.flush()                 # an event without its blank line (maybe the [DONE])
            if not relay.done:                   # the body ended without its last event: whatever its framing, a cut
                raise UpstreamError(f"The provider {provider!r} closed the stream before its end (no {api.end}).")
            if tail:
                yield tail
        except UpstreamError as err:             # the provider cut or stalled the stream after it began...
            status = streams.cut_reason(resp)    # ...or we did (streams.py): the caller left, or we are stopping
            if status == "client_closed":
                return
            if status == "shutdown":
                yield api.sse_error(ServiceUnavailable(
                    "The gateway is restarting and ended this stream; retry the request.", code="shutting_down"))
                return
            status = "upstream_timeout" if isinstance(err, UpstreamTimeout) else "upstream_cut"
            why = "%s: %s" % reason(err.__cause__, reading=True) if err.__cause__ is not None else err.message
            log.warning("stream from %s ended early: %s (%s)", provider, status, why)
            yield api.sse_error(err)
    except GeneratorExit:                        # the caller hung up: gunicorn closed the iterator
        status = "client_closed"
        raise
    finally:
        close(resp, status == "complete")        # else closes the upstream socket: the provider stops generating
        streams.discard(resp)
        outcome.usage = api.reader(relay.usage) if relay.usage is not None else None
        # Settled at [DONE] (what followed cannot change the charge): reported as the ledger has it.
        _finish(lease, outcome, "complete" if settled_at_done else status, started, finish)


def _settle(lease: Lease, outcome: Outcome, status: str, started: float) -> None:
    outcome.outcome = status
    outcome.latency_ms = (time.perf_counter() - started) * 1000
    billing.settle_or_defer(lease, outcome)


def _finish(lease: Lease, outcome: Outcome, status: str, started: float, finish: Finish) -> None:
    """Settle (unless done already: settling twice changes nothing) and report the request, once."""
    try:
        _settle(lease, outcome, status, started)
    finally:
        finish(lease, outcome)
