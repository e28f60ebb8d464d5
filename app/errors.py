"""
app.errors
~~~~~~~~~~

The one error hierarchy of the gateway, and the only place errors are rendered.

Every error a caller can see is a :class:`GatewayError` subclass that knows its HTTP status and its OpenAI
error ``type``/``code``. Views and modules raise them; :func:`init_app` registers the app-level handlers that
turn them (and Werkzeug's routing errors, and anything unexpected) into OpenAI-shaped JSON:
``{"error": {"message", "type", "param", "code"}}``. Nothing here ever puts a traceback or a secret in a body.
"""
from __future__ import annotations

import logging

from flask import Flask
from flask import Response
from flask import json
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

    def response(self) -> Response:
        resp = Response(json.dumps(self.to_dict()), status=self.status, mimetype="application/json")
        resp.headers.update(self.headers)
        return resp


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


class ModelNotFound(GatewayError):
    """The model is not in the catalogue."""

    status, type, code = 404, "invalid_request_error", "model_not_found"


class RateLimited(GatewayError):
    """The key is over its per-minute or per-day limit; safe to retry after ``Retry-After`` seconds."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


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


def _handle_gateway_error(err: GatewayError) -> Response:
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
