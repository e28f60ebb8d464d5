"""app.server.workertune: gunicorn's per-request settings and Date header, made once per worker / per second, read
the same as before; and a gateway under gunicorn (which installs it) still answers with gunicorn's headers."""
from __future__ import annotations

import email.utils
import http.client
import time

import time_machine
from gunicorn import util
from gunicorn.config import Config

from app.server import workertune


def _config() -> Config:
    cfg = Config()
    cfg.set("limit_request_fields", 57)
    cfg.set("raw_env", ["A=1"])
    cfg.set("keepalive", 9)
    return cfg


def test_the_snapshot_reads_every_setting_as_the_config_does():
    cfg = _config()
    frozen = workertune.FrozenConfig(cfg)
    for name in cfg.settings:
        assert getattr(frozen, name) == getattr(cfg, name), name
    assert (frozen.limit_request_fields, frozen.keepalive, frozen.env) == (57, 9, {"A": "1"})
    assert frozen.is_ssl is cfg.is_ssl and not frozen.is_ssl      # a Config property, read through
    assert frozen.settings is cfg.settings
    assert "keepalive" in vars(frozen)                           # a plain attribute: no lookup per request


class _Worker:
    def __init__(self) -> None:
        self.cfg = _config()


def test_install_freezes_the_workers_settings_once_and_caches_the_date(monkeypatch):
    monkeypatch.setattr(util, "http_date", util.http_date)        # restored after the test
    worker = _Worker()
    workertune.install(worker)
    frozen, date_fn = worker.cfg, util.http_date
    workertune.install(worker)                                   # idempotent
    assert isinstance(frozen, workertune.FrozenConfig) and worker.cfg is frozen and util.http_date is date_fn
    assert frozen.keepalive == 9


def test_the_cached_date_is_the_formatted_date_of_the_current_second():
    date = workertune.cached_http_date(util.http_date)
    with time_machine.travel(1_700_000_000.25, tick=False):
        assert date() == email.utils.formatdate(1_700_000_000, usegmt=True) == "Tue, 14 Nov 2023 22:13:20 GMT"
    with time_machine.travel(1_700_000_000.9, tick=False):
        assert date() == "Tue, 14 Nov 2023 22:13:20 GMT"          # same second: the kept value
    with time_machine.travel(1_700_000_001.0, tick=False):
        assert date() == "Tue, 14 Nov 2023 22:13:21 GMT"          # the next second: made anew
    assert date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"             # an explicit time is never cached


def test_a_gateway_answer_still_carries_gunicorns_headers(gateway):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    for connection in ("keep-alive", "close"):
        conn.request("GET", "/healthz", headers={"Connection": connection})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read().strip() == b'{"status":"ok"}'
        assert resp.getheader("Server") == "gunicorn" and resp.getheader("Connection") == connection
        parsed = email.utils.parsedate_to_datetime(resp.getheader("Date"))
        assert abs(parsed.timestamp() - time.time()) < 60
    conn.close()
