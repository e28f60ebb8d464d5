"""Health probes end to end: gunicorn over HTTP, no key. /healthz says the process answers; /readyz checks the
database, the rate-limit storage and the catalogue, and names what failed in an OpenAI-shaped 503."""
from __future__ import annotations

import time

import requests

from support import Database
from support import Gateway
from support import free_port

MSG = [{"role": "user", "content": "hi"}]


def assert_not_ready(resp: requests.Response, failed: list[str]) -> dict:
    assert resp.status_code == 503, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error", "checks"}, body
    assert body["error"] == {"message": "not ready: " + ", ".join(failed), "type": "service_unavailable",
                             "param": None, "code": "not_ready"}
    assert set(body["checks"]) == {"database", "ratelimit_storage", "catalogue"}
    for name, result in body["checks"].items():
        assert result == ("failed" if name in failed else "ok"), body
    return body


def test_healthz_and_readyz_need_no_key(gateway):
    resp = requests.get(gateway.url + "/healthz", timeout=10)
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    resp = requests.get(gateway.url + "/readyz", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ready",
                           "checks": {"database": "ok", "ratelimit_storage": "ok", "catalogue": "ok"}}
    assert resp.headers["Cache-Control"] == "no-store"
    # HEAD works for probes that use it, and a wrong method is the usual JSON 405
    assert requests.head(gateway.url + "/healthz", timeout=10).status_code == 200
    assert requests.post(gateway.url + "/readyz", timeout=10).status_code == 405


def test_readyz_names_an_unreachable_ratelimit_storage(gateway_factory):
    port = free_port()          # nothing listens there
    gw = gateway_factory(ratelimit_storage=f"redis://127.0.0.1:{port}/0")
    key = gw.create_key()
    assert requests.get(gw.url + "/healthz", timeout=10).json() == {"status": "ok"}   # alive, not ready
    resp = requests.get(gw.url + "/readyz", timeout=10)
    assert_not_ready(resp, ["ratelimit_storage"])
    assert "redis" not in resp.text and str(port) not in resp.text
    # by design, chat requests fail closed rather than run unlimited
    chat = requests.post(gw.base_url + "/chat/completions", json={"model": "free-model", "messages": MSG},
                         headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "ratelimit_unavailable"


def test_readyz_names_a_database_that_is_gone(gateway_factory, tmp_path, mock):
    password = "s3cret-pw-" + str(time.time_ns())
    db = Database("postgres", tmp_path)
    try:
        # the server trusts local connections, so the password is never checked, but it is part of the setting
        url = db.url.replace("postgres@", f"postgres:{password}@")
        # the schema first, as `boundless serve` does: workers creating it at once on a fresh database race
        Gateway(tmp_path / "admin", mock.url, database_url=url).cli("db", "upgrade")
        gw = gateway_factory(database_url=url, workers=2)
        for _ in range(4):                          # every worker has a pooled connection by now (likely)
            assert requests.get(gw.url + "/readyz", timeout=10).status_code == 200
        db.drop()
        for _ in range(4):                          # whichever worker answers
            resp = requests.get(gw.url + "/readyz", timeout=10)
            assert_not_ready(resp, ["database"])
            assert password not in resp.text and db.name not in resp.text and "postgresql" not in resp.text
        assert requests.get(gw.url + "/healthz", timeout=10).status_code == 200
        assert password not in gw.log()
    finally:
        db.drop()
