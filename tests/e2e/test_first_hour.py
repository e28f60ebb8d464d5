"""Issue 19, through a gateway under gunicorn: the offline trial on any port, the start-up summary, disabled
keys (401 key_disabled), keys without a limit, the singular in messages, refusal counts in `boundless usage`."""
from __future__ import annotations

import json
import sqlite3

import openai
import pytest
import requests

from support import ROOT
from support import Gateway
from support import ledger_check

MSG = [{"role": "user", "content": "hello there"}]


def test_offline_trial_on_another_port_and_the_start_up_summary(mock, tmp_path):
    # the mock is on a random port, not 9100: MOCK_UPSTREAM_URL tells config/offline.toml where it is
    gw = Gateway(tmp_path / "gw", mock.url, env={"BOUNDLESS_CONFIG": str(ROOT / "config" / "offline.toml"),
                                                 "MOCK_UPSTREAM_URL": mock.url})
    with gw:
        key = gw.create_key("trial")
        out = gw.client(key).chat.completions.create(model="mock-chat", messages=MSG)
        assert out.choices[0].message.content.startswith("tok0")
    log = gw.log()
    summary = [line for line in log.splitlines() if line.startswith("boundless: ")]
    assert summary == [
        f"boundless: catalogue {ROOT / 'config' / 'offline.toml'}: 2 models, 1 provider",
        f"boundless: database {gw.database_url}",
        f"boundless: rate-limit storage sqlite:///{tmp_path / 'gw' / 'boundless-ratelimit.db'} (the default)",
        "boundless: 2 gevent workers",
    ]                                                  # once per start, though two workers booted
    assert "settled 0" not in log


def test_start_up_summary_warns_of_a_provider_without_key_and_hides_passwords(mock, tmp_path):
    gw = Gateway(tmp_path / "gw", mock.url, workers=1, ratelimit_storage="redis://:s3cret-pw@127.0.0.1:6379/12",
                 env={"MOCK_PROVIDER_KEY": "", "BOUNDLESS_WORKER_CLASS": "gthread"})
    with gw:
        pass
    log = gw.log()
    assert "boundless: rate-limit storage redis://:***@127.0.0.1:6379/12" in log
    assert "boundless: 1 gthread worker\n" in log
    assert ("boundless: warning: provider 'mock' has no key: MOCK_PROVIDER_KEY is not set, so calls to its "
            "2 models will fail") in log
    assert "s3cret-pw" not in log


def _chat(client, model="free-model"):
    return client.chat.completions.create(model=model, messages=MSG, max_tokens=5)


def test_disabled_unlimited_singular_and_refusal_counts(gateway_factory):
    gw = gateway_factory(rpm=1000, rpd=1)           # the day, not the minute: no window edge between two calls
    limited, poor, free = gw.create_key("limited"), gw.create_key("poor"), gw.create_key("free", rpd="none")

    _chat(gw.client(limited))
    with pytest.raises(openai.RateLimitError) as err:
        _chat(gw.client(limited))
    assert "1 request per day" in err.value.message              # not "1 requests"

    with pytest.raises(openai.APIStatusError) as err:
        _chat(gw.client(poor), "paid-model")
    assert err.value.status_code == 402

    gw.cli("keys", "disable", "free")
    with pytest.raises(openai.AuthenticationError) as err:
        _chat(gw.client(free))
    assert err.value.code == "key_disabled" and "disabled" in err.value.message
    models = requests.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {free}"}, timeout=10)
    assert models.status_code == 401 and models.json()["error"]["code"] == "key_disabled"

    gw.cli("keys", "enable", "free")
    for _ in range(3):                                            # over the catalogue's 1 per day: no limit
        raw = gw.client(free).chat.completions.with_raw_response.create(model="free-model", messages=MSG)
        assert raw.http_response.status_code == 200
        assert "X-RateLimit-Remaining-RPD" not in raw.headers and raw.headers["X-RateLimit-Remaining-RPM"]
        assert raw.headers["x-ratelimit-limit-requests"] == "1000"   # OpenAI's headers speak of the limited window
    info = requests.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {free}"}, timeout=10).json()["data"]
    assert (info["rpd"], info["remaining_rpd"], info["rpm"]) == (None, None, 1000)

    report = {r["key"]: r for r in json.loads(gw.cli("usage", "--by", "key", "--json").stdout)}
    assert report["limited"]["refused"] == {"rate_limited": 1} and report["limited"]["requests"] == 1
    assert report["poor"]["refused"] == {"insufficient_quota": 1} and report["poor"]["requests"] == 0
    assert report["free"]["refused"] == {"key_disabled": 2} and report["free"]["requests"] == 3
    by_model = {r["model"]: r["refused"] for r in json.loads(gw.cli("usage", "--by", "model", "--json").stdout)}
    assert by_model == {"free-model": {"rate_limited": 1}, "paid-model": {"insufficient_quota": 1},
                        None: {"key_disabled": 2}}
    text = gw.cli("usage", "--by", "key").stdout
    assert "REFUSED BECAUSE" in text and "insufficient_quota" in text

    # a count that cannot be written never fails the refusal itself
    conn = sqlite3.connect(gw.database_url[len("sqlite:///"):])
    conn.execute("DROP TABLE refusal")
    conn.close()
    with pytest.raises(openai.RateLimitError):
        _chat(gw.client(limited))
    assert "request reporter" in gw.log()
    ledger_check(gw.database_url)
