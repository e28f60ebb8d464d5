"""
app.auth
~~~~~~~~

Who is calling: ``Authorization: Bearer sk-...`` (or, on the Anthropic Messages route, ``x-api-key: sk-...``)
→ SHA-256 → the key's row (cached briefly per process).
"""
from __future__ import annotations

from flask import g
from flask import request

from . import policy
from .errors import AuthenticationError
from .errors import anthropic_route
from .keys import KeyInfo
from .keys import mask
from .state import state
from .store.models import utcnow


def authenticate() -> KeyInfo:
    """Return the calling key, memoised on ``g`` for the rest of the request.

    :raise AuthenticationError: 401 when the key is missing, malformed, unknown or revoked (``invalid_api_key``),
        or disabled (``key_disabled``, until ``boundless keys enable``), or past its expiry (``key_expired``).
    """
    key = g.get("_boundless_key")
    if key is not None:
        return key
    header = request.headers.get("Authorization", "")
    if not header and anthropic_route() and request.headers.get("x-api-key"):
        header = "Bearer " + request.headers["x-api-key"]      # the Anthropic SDKs and Claude Code send this
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if not header:
        raise AuthenticationError("You didn't provide an API key. Send it in the Authorization header as "
                                  "'Authorization: Bearer sk-...'.")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("The Authorization header must be 'Bearer sk-...'.")
    info = state().keys.lookup(token)
    if info is None:
        raise AuthenticationError(f"Incorrect API key provided: {mask(token)}. The key is unknown or revoked.")
    if info.disabled:
        g.boundless_refused_key = info         # known, so its refusal is counted (app/server/reporting.py)
        raise AuthenticationError(f"The API key {mask(token)} is disabled. Ask the gateway's operator to enable "
                                  f"it again.", code="key_disabled")
    if policy.expired(info, utcnow()):
        g.boundless_refused_key = info
        raise AuthenticationError(f"The API key {mask(token)} expired at {policy.iso_utc(info.expires_at)}. Ask the "
                                  f"gateway's operator for a new key or a later expiry.", code="key_expired")
    g._boundless_key = info
    return info
