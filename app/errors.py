"""
app.errors
~~~~~~~~~~

The one error hierarchy of the gateway, and the only place errors are rendered.

Every error a caller can see is a :class:`GatewayError` subclass that knows its HTTP status and its OpenAI
error ``type``/``code``. Views and modules raise them; :func:`init_app` registers the app-level handlers that
turn them (and Werkzeug's routing errors, and anything unexpected) into OpenAI-shaped JSON:
``{"error": {"message", "type", "param", "code"}}``, except on the Anthropic Messages route (``/messages``),
whose callers are Anthropic SDKs: there the same errors, with the same statuses, take Anthropic's shape
``{"type": "error", "error": {"type", "message"}}`` (:func:`anthropic_route` decides, by path, in this one
place). Nothing here ever puts a traceback or a secret in a body.
"""
from __future__ import annotations

import logging
import re

from flask import Flask
from flask import Response
from flask import g
from flask import has_request_context
from flask import json
from flask import request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("boundless")


class GatewayError(Exception):
    """Base for every error the gateway reports to a client."""

    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_anthropic(self) -> dict:
        """The error in the shape of Anthropic's API (for the ``/messages`` route)."""
        kind = _ANTHROPIC_TYPES.get(self.status) or ("api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self) -> Response:
        body = self.to_anthropic() if anthropic_route() else self.to_dict()
        resp = Response(json.dumps(body), status=self.status, mimetype="application/json")
        resp.headers.update(self.headers)
        return resp


#: Anthropic's error ``type`` for each status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}

#: The Anthropic Messages API's paths, under either prefix (``/api/v1`` or ``/v1``).
_ANTHROPIC_PATH = re.compile(r"/(?:api/)?v1/messages(?:/|$)")


def anthropic_route(path: str | None = None) -> bool:
    """Whether the request (or ``path``) is on the Anthropic Messages API, whose errors take Anthropic's shape."""
    if path is None:
        if not has_request_context():
            return False
        path = request.path
    return _ANTHROPIC_PATH.match(path) is not None


class InvalidRequest(GatewayError):
    """The body or a parameter is not acceptable. Fix the request; retrying it unchanged will fail again."""

    status, type, code = 400, "invalid_request_error", "invalid_request"


class RequestTimeout(GatewayError):
    """The request body did not arrive within BOUNDLESS_BODY_TIMEOUT (app/server/bodytimeout.py)."""

    status, type, code = 408, "invalid_request_error", "request_timeout"


class AuthenticationError(GatewayError):
    """The key is missing, unknown or revoked."""

    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class PermissionDenied(GatewayError):
    """The key is valid but may not call this route: an admin key outside the admin API (``admin_key``), or
    a normal key on the admin API (``not_admin``)."""

    status, type, code = 403, "permission_error", "permission_denied"


class NotFound(GatewayError):
    """The named object (a key, on the admin API) does not exist."""

    status, type, code = 404, "invalid_request_error", "not_found"


class Conflict(GatewayError):
    """The change clashes with what exists: a key name already taken, a revoked key changed."""

    status, type, code = 409, "invalid_request_error", "conflict"


class InsufficientCredits(GatewayError):
    """The key's balance cannot cover the worst case of a paid request. Top up, or ask for fewer tokens.

    402 rather than OpenAI's 429 ``insufficient_quota``: SDKs retry 429s, and retrying cannot help here.
    """

    status, type, code = 402, "insufficient_quota", "insufficient_quota"


class WrongEndpoint(InvalidRequest):
    """The model exists but this endpoint cannot serve it: an embedding model on a chat endpoint or the reverse
    (``wrong_model_kind``), or a provider that does not speak this endpoint's API (``endpoint_not_supported``)."""

    code = "wrong_model_kind"


class BudgetExceeded(InsufficientCredits):
    """The key's spending budget for its period (``keys ... --budget``) cannot cover the worst case. Retrying
    helps only after ``Retry-After`` (the period's end) or with a smaller ``max_tokens``."""

    code = "budget_exceeded"


class ModelNotAllowed(GatewayError):
    """The model is in the catalogue but not in the key's allow-list (``keys ... --models``). Use another model."""

    status, type, code = 403, "permission_error", "model_not_allowed"


class ModelNotFound(GatewayError):
    """The model is not in the catalogue."""

    status, type, code = 404, "invalid_request_error", "model_not_found"


class RateLimited(GatewayError):
    """The key is over its per-minute or per-day limit; safe to retry after ``Retry-After`` seconds."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class TooManyParallel(RateLimited):
    """The key already has its ``--max-parallel`` requests in flight. Retry when one of them has ended."""

    code = "too_many_parallel_requests"


class UpstreamError(GatewayError):
    """The provider failed or could not be reached. Safe to retry."""

    status, type, code = 502, "upstream_error", "upstream_error"


class UpstreamTimeout(UpstreamError):
    """The provider did not answer in time. Safe to retry."""

    status, code = 504, "upstream_timeout"


class ServiceUnavailable(GatewayError):
    """A dependency of the gateway (database, limit storage) is unreachable. Safe to retry later."""

    status, type, code = 503, "service_unavailable", "service_unavailable"


class InternalError(GatewayError):
    """The gateway itself failed (a bug): logged with its traceback; nothing was charged. Safe to retry."""

    status, type, code = 500, "api_error", "internal_error"


class ConfigurationError(Exception):
    """The gateway's configuration is invalid; raised at start-up, never per request."""


def sse_error_event(err: GatewayError) -> bytes:
    """Render ``err`` as one SSE event, for failures after a stream's first byte (the status line is gone)."""
    return b"data: " + json.dumps(err.to_dict()).encode() + b"\n\n"


def anthropic_sse_error_event(err: GatewayError) -> bytes:
    """``err`` as the ``error`` event of an Anthropic stream (the Anthropic SDKs raise it as an API error)."""
    return b"event: error\ndata: " + json.dumps(err.to_anthropic()).encode() + b"\n\n"


def _handle_gateway_error(err: GatewayError) -> Response:
    if has_request_context():
        g.boundless_error_code = err.code      # the refusal's reason for the report (app/server/reporting.py)
    return err.response()


def _handle_http_exception(err: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.code or 500)
    status = err.code or 500
    out = GatewayError(err.description or err.name, code=code, status=status)
    out.type = "invalid_request_error" if status < 500 else "api_error"
    resp = out.response()
    if status == 405 and err.response is None:
        allowed = err.get_headers()
        resp.headers.extend([(k, v) for k, v in allowed if k.lower() == "allow"])
    return resp


def _handle_unexpected(err: Exception) -> Response:
    log.exception("unhandled error")
    return InternalError("The server had an error while processing your request.").response()


def init_app(app: Flask) -> None:
    """Register the JSON error handlers on the app (blueprint handlers never see routing 404/405)."""
    app.register_error_handler(GatewayError, _handle_gateway_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
