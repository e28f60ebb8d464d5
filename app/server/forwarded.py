"""
app.server.forwarded
~~~~~~~~~~~~~~~~~~~~

The caller's address behind a reverse proxy. gunicorn's ``forwarded_allow_ips`` only covers the scheme, so
``REMOTE_ADDR`` stays the proxy's. When (and only when) the peer is a trusted proxy
(``BOUNDLESS_FORWARDED_ALLOW_IPS``, comma-separated, ``*`` for any), the address is taken from the last hop
of ``X-Forwarded-For``: the one the proxy itself appended, which the caller cannot forge.
"""
from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix


class TrustedProxyFix:
    def __init__(self, wsgi_app, trusted: str) -> None:
        self.app = wsgi_app
        self.fixed = ProxyFix(wsgi_app, x_for=1, x_proto=0, x_host=0, x_port=0, x_prefix=0)
        self.trusted = {t.strip() for t in trusted.split(",") if t.strip()}

    def __call__(self, environ, start_response):
        if "*" in self.trusted or environ.get("REMOTE_ADDR") in self.trusted:
            return self.fixed(environ, start_response)
        return self.app(environ, start_response)


def init_app(app: Flask) -> None:
    app.wsgi_app = TrustedProxyFix(app.wsgi_app, str(app.config["BOUNDLESS_FORWARDED_ALLOW_IPS"]))
