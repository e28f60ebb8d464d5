"""
app.console
~~~~~~~~~~~

The web console at ``/console/``: server-rendered pages (Jinja) for the operator (keys, usage, ledger,
providers, audit log) and a self-service page for each key holder (``/console/me``). It works on an
air-gapped box: its CSS, its one small script and its charts (SVG drawn on the server) come from the package.

Safe by construction:

* sessions are Flask's signed cookie (``HttpOnly``, ``SameSite=Lax``, ``Secure`` when the request came over
  HTTPS), signed with ``BOUNDLESS_SECRET_KEY`` or a key generated once into a file (:mod:`.secret`);
* every form carries a CSRF token, checked by Flask-WTF on every POST of this blueprint (and only here: the
  JSON API authenticates by bearer key and has no cookies to forge);
* sign-in attempts are throttled per address and per user by Flask-Limiter, on the same storage as the
  API's rate-limit counters;
* Jinja escapes every text (a key named ``<script>`` shows as text); ``Content-Security-Policy`` allows no
  inline script, and ``X-Frame-Options: DENY``;
* a key is shown once, in the answer to its creation, and never stored anywhere but as its digest.

``BOUNDLESS_CONSOLE=0`` leaves the blueprint out: ``/console/`` is then a 404 like any unknown path.
"""
from __future__ import annotations

from flask import Blueprint
from flask import Flask
from flask import has_request_context
from flask import request
from flask.sessions import SecureCookieSessionInterface
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect

from ..limits import sqlite_storage  # noqa: F401  (registers the sqlite:// scheme with `limits`)
from .secret import secret_key

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static")

#: CSRF tokens for the console's forms; checked by the blueprint's before_request, not app-wide.
csrf = CSRFProtect()

#: Sign-in throttling only: the API's per-key limits are app/limits (see README, "Rate limits").
limiter = Limiter(key_func=get_remote_address, strategy="fixed-window", headers_enabled=False)


@limiter.request_filter
def _not_console() -> bool:
    """The throttle is the console's: every other request (the API's) skips Flask-Limiter's checks at once."""
    return request.blueprint != "console"


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with ``Secure`` set when the request itself came over HTTPS (behind
    nginx: ``X-Forwarded-Proto`` from a peer in ``BOUNDLESS_FORWARDED_ALLOW_IPS``, as gunicorn reads it).

    Only the console has sessions (the cookie's path is ``/console``, so no browser sends it elsewhere): any
    other request gets Flask's null session at once, without building the signing serializer.
    """

    def open_session(self, app: Flask, request):
        path = request.path
        if path != "/console" and not path.startswith("/console/"):
            return self.make_null_session(app)
        return super().open_session(app, request)

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or (has_request_context() and request.is_secure)


def init_app(app: Flask, ratelimit_storage: str) -> None:
    """Register the console on ``app`` unless ``BOUNDLESS_CONSOLE`` is off.

    :param ratelimit_storage: the API's rate-limit storage URI, which the sign-in throttle shares.
    """
    if not app.config["BOUNDLESS_CONSOLE"]:
        return
    app.secret_key = secret_key(str(app.config["BOUNDLESS_SECRET_KEY"]), str(app.config["BOUNDLESS_DATABASE_URL"]))
    app.config.update(
        SESSION_COOKIE_NAME="boundless_console", SESSION_COOKIE_PATH="/console", SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax", PERMANENT_SESSION_LIFETIME=12 * 3600,
        WTF_CSRF_CHECK_DEFAULT=False, WTF_CSRF_TIME_LIMIT=12 * 3600,
        RATELIMIT_STORAGE_URI=ratelimit_storage, RATELIMIT_KEY_PREFIX="console",
    )
    app.session_interface = _SessionInterface()
    csrf.init_app(app)
    limiter.init_app(app)
    app.register_blueprint(bp)


# The views register themselves on ``bp``; imported last because they import ``bp`` from here.
from . import views  # noqa: E402,F401
from . import pages  # noqa: E402,F401
