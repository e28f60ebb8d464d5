"""Fixtures shared by the tests: the fake upstream, gateways under gunicorn, fresh keys, databases."""
from __future__ import annotations

import os

import pytest

from bench.mock_upstream import MockUpstream
from support import Database
from support import Gateway


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch):
    """No test sees the developer's BOUNDLESS_* settings or proxy variables."""
    for name in list(os.environ):
        if name.startswith("BOUNDLESS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def mock():
    """The fake OpenAI-compatible upstream: a real HTTP server on 127.0.0.1 (5 chunks, 50 ms apart)."""
    with MockUpstream(chunks=5, gap=0.05) as m:
        yield m


@pytest.fixture
def gateway_factory(tmp_path_factory, mock):
    """Start gateways (stopped at the end of the test): ``gateway_factory(workers=4, ...)``."""
    started = []

    def make(upstream_url: str | None = None, **kw) -> Gateway:
        gw = Gateway(tmp_path_factory.mktemp("gw"), upstream_url or mock.url, **kw)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, mock):
    """One 2-worker gateway on SQLite shared by a test module (use a fresh key per test)."""
    gw = Gateway(tmp_path_factory.mktemp("gw"), mock.url).start()
    yield gw
    gw.stop()


@pytest.fixture
def key(gateway):
    """A fresh key (default limits, no credit) on the module's gateway."""
    return gateway.create_key()


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def database(request, tmp_path):
    """An empty database of each kind the gateway supports (PostgreSQL and MariaDB run on the machine)."""
    db = Database(request.param, tmp_path)
    yield db
    db.drop()
