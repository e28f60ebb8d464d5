"""Per-key policy end to end, under gunicorn, with the OpenAI SDK: allowed models, expiry, a spending budget and
parallel requests; each refusal with its status and code, at no cost, counted in `boundless usage` by reason, and
(except the budget's 402, decided in the reservation like any 402) without using up the rate limit."""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import threading
import time
from decimal import Decimal

import openai
import pytest
import requests

from app.accounting.billing import prompt_upper_bound
from support import PAID_IN
from support import PAID_OUT
from support import Gateway
from support import ledger_check

MSG = [{"role": "user", "content": "hello there"}]
EXTRA = """
[models."deepseek-chat"]
provider = "mock"
upstream_model = "mock-model"

[models."deepseek-coder"]
provider = "mock"
upstream_model = "mock-model"
"""
#: A stream that sends one event and then stays open (the provider "thinking") for 30 s.
STALLED = {"chunks": 3, "gap": 0.0, "stall_after": 1, "stall": 30}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, mock):
    gateway = Gateway(tmp_path_factory.mktemp("gw"), mock.url, rpm=1000, rpd=10_000, catalog_extra=EXTRA,
                      env={"BOUNDLESS_UPSTREAM_READ_TIMEOUT": "60"}).start()
    yield gateway
    gateway.stop()


def _get(gw: Gateway, key: str, path: str) -> requests.Response:
    return requests.get(gw.base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def _chat(gw: Gateway, key: str, model: str = "free-model", stream: bool = False, **extra) -> requests.Response:
    return requests.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                         json={"model": model, "messages": MSG, "stream": stream, **extra}, stream=stream)


def _remaining(gw: Gateway, key: str) -> tuple[int, int]:
    data = _get(gw, key, "/key").json()["data"]
    return data["remaining_rpm"], data["remaining_rpd"]


def _refused(gw: Gateway, name: str) -> dict:
    rows = json.loads(gw.cli("usage", "--key", name, "--by", "key", "--json").stdout)
    return rows[0]["refused"] if rows else {}


def _listed(gw: Gateway, name: str) -> dict:
    return {r["name"]: r for r in json.loads(gw.cli("keys", "list", "--json").stdout)}[name]


def test_models_allow_list(gw):
    key = gw.create_key("intern", models="deepseek-*,free-model", credit=1)
    client = gw.client(key)
    assert sorted(m.id for m in client.models.list()) == ["deepseek-chat", "deepseek-coder", "free-model"]
    assert client.chat.completions.create(model="deepseek-coder", messages=MSG).choices[0].message.content
    before = _remaining(gw, key)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="paid-model", messages=MSG)
    err = refused.value
    assert err.status_code == 403 and err.body["code"] == "model_not_allowed" and err.body["param"] == "model"
    assert "'paid-model'" in err.body["message"] and "deepseek-*, free-model" in err.body["message"]
    assert _remaining(gw, key) == before                       # a refused model uses up no request
    with pytest.raises(openai.NotFoundError):                  # not in the catalogue at all: still a 404
        client.chat.completions.create(model="gpt-5", messages=MSG)
    data = _get(gw, key, "/key").json()["data"]
    assert (data["models"], data["expires_at"], data["max_parallel"]) == (["deepseek-*", "free-model"], None, None)
    assert _listed(gw, "intern")["models"] == ["deepseek-*", "free-model"]

    gw.cli("keys", "update", "intern", "--models", "*")
    assert len(client.models.list().data) == 4
    assert client.chat.completions.create(model="paid-model", messages=MSG, max_tokens=5).choices
    assert _get(gw, key, "/key").json()["data"]["models"] == ["*"]
    assert _refused(gw, "intern") == {"model_not_allowed": 1, "model_not_found": 1}
    res = gw.cli("keys", "update", "intern", "--models", "gtp-4o", check=False)     # a typo: said, still stored
    assert res.returncode == 0 and "matches no model of the catalogue" in res.stderr
    assert gw.cli("keys", "update", "intern", "--models", "a,,b", check=False).returncode == 1


def test_expiry(gw):
    key = gw.create_key("contractor", expires="1h")
    expires = _get(gw, key, "/key").json()["data"]["expires_at"]
    moment = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00"))
    now = datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=58) < moment - now <= datetime.timedelta(hours=1)
    assert _listed(gw, "contractor")["expires_at"] == expires
    assert expires in gw.cli("keys", "list").stdout

    gw.cli("keys", "update", "contractor", "--expires", "2020-01-01")
    client = gw.client(key)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="free-model", messages=MSG)
    assert refused.value.status_code == 401 and refused.value.body["code"] == "key_expired"
    assert "2020-01-01T00:00:00Z" in refused.value.body["message"]
    assert _get(gw, key, "/models").json()["error"]["code"] == "key_expired"    # every route
    assert _listed(gw, "contractor")["state"] == "expired"

    gw.cli("keys", "update", "contractor", "--expires", "never")
    assert client.chat.completions.create(model="free-model", messages=MSG).choices
    assert _listed(gw, "contractor")["expires_at"] is None
    assert _refused(gw, "contractor") == {"key_expired": 2}
    bad = gw.cli("keys", "update", "contractor", "--expires", "next tuesday", check=False)
    assert bad.returncode == 1 and "--expires" in bad.stderr


def test_budget(gw):
    body = {"model": "paid-model", "messages": MSG, "max_tokens": 20}
    worst = prompt_upper_bound(body) * PAID_IN + 20 * PAID_OUT
    key = gw.create_key("capped", credit=10, budget=f"{3 * worst / 1e6:.6f}", **{"budget-period": "day"})
    client = gw.client(key)
    admitted = 0
    for _ in range(20):                          # each charge is far below the worst case: several fit
        try:
            client.chat.completions.create(**body)
            admitted += 1
        except openai.APIStatusError as err:
            refused = err
            break
    else:
        pytest.fail("the budget never refused")
    assert admitted >= 3
    assert refused.status_code == 402 and refused.body["code"] == "budget_exceeded"
    retry = int(refused.response.headers["Retry-After"])
    data = _get(gw, key, "/key").json()["data"]
    resets = datetime.datetime.fromisoformat(data["budget_resets_at"])
    assert resets.time() == datetime.time() and 0 < retry <= 86_400
    assert data["budget_resets_at"] in refused.body["message"]
    assert (Decimal(data["budget"]), data["budget_period"]) == (Decimal(f"{3 * worst / 1e6:.6f}"), "day")
    assert Decimal(data["budget_spent"]) == Decimal(data["spent"]) > 0   # the day's spending is all the spending
    assert Decimal(data["balance"]) == 10 - Decimal(data["spent"])   # the refusal cost nothing (amounts: strings)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(**body)
    assert _get(gw, key, "/key").json()["data"]["balance"] == data["balance"]
    assert client.chat.completions.create(model="free-model", messages=MSG).choices   # free models still pass
    assert _refused(gw, "capped") == {"budget_exceeded": 2}
    listed = _listed(gw, "capped")
    assert (listed["budget_period"], listed["budget_spent"]) == ("day", data["budget_spent"])

    gw.cli("keys", "update", "capped", "--budget", "none")
    assert client.chat.completions.create(**body).choices
    assert _get(gw, key, "/key").json()["data"]["budget"] is None
    ledger_check(gw.database_url)


def _stalled(gw: Gateway, key: str) -> requests.Response:
    """Open a stream that stays in flight; return it once the gateway admitted it (its first event arrived)."""
    resp = _chat(gw, key, stream=True, mock=STALLED)
    if resp.status_code == 200:
        next(resp.iter_lines())
    return resp


def _admitted_after(gw: Gateway, key: str, bound: float) -> int | None:
    """Poll (at most ``bound`` seconds) until a request of the key is admitted again; return how many were
    refused meanwhile, or None if none was admitted."""
    deadline = time.monotonic() + bound
    refused = 0
    while time.monotonic() < deadline:
        resp = _chat(gw, key)
        if resp.status_code == 200:
            return refused
        assert resp.json()["error"]["code"] == "too_many_parallel_requests"
        refused += 1
        time.sleep(0.5)
    return None


def test_max_parallel_counts_across_workers_and_frees_every_slot(gw):
    key = gw.create_key("pool", **{"max-parallel": 2})
    assert _get(gw, key, "/key").json()["data"]["max_parallel"] == 2
    results: list[requests.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def one():
        start.wait()
        resp = _stalled(gw, key)
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code != 200]
    assert len(ok) == 2 and len(refused) == 4
    for r in refused:
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_parallel_requests"
        assert "Retry-After" not in r.headers
    before = _remaining(gw, key)
    assert _chat(gw, key).status_code == 429
    assert _remaining(gw, key) == before                   # a refused request uses up no request
    for r in ok:                                           # the callers hang up: their slots come back
        r.close()
    polled = _admitted_after(gw, key, 20)
    assert polled is not None

    # every other way a request ends gives its slot back: JSON, upstream failure, 402, a finished stream
    gw.cli("keys", "update", "pool", "--max-parallel", "1")
    for _ in range(3):
        assert _chat(gw, key).status_code == 200
    assert _chat(gw, key, mock={"status": 500}).status_code == 502
    assert _chat(gw, key, model="paid-model").status_code == 402
    resp = _chat(gw, key, stream=True)
    assert resp.status_code == 200 and b"[DONE]" in resp.content
    assert _chat(gw, key).status_code == 200
    assert _refused(gw, "pool")["too_many_parallel_requests"] == 5 + polled
    gw.cli("keys", "update", "pool", "--max-parallel", "none")
    assert _get(gw, key, "/key").json()["data"]["max_parallel"] is None
    ledger_check(gw.database_url)


def test_a_worker_killed_with_slots_frees_them_within_a_minute(gateway_factory):
    gw = gateway_factory(workers=1, env={"BOUNDLESS_UPSTREAM_READ_TIMEOUT": "60"})
    key = gw.create_key("doomed", **{"max-parallel": 2})
    held = [_stalled(gw, key), _stalled(gw, key)]
    assert [r.status_code for r in held] == [200, 200]
    assert _chat(gw, key).status_code == 429
    workers = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGKILL)
    for r in held:
        r.close()
    deadline = time.monotonic() + 30                  # gunicorn starts a new worker
    while time.monotonic() < deadline:
        try:
            first = _chat(gw, key)
            break
        except requests.ConnectionError:
            time.sleep(0.2)
    assert first.status_code == 429                   # the dead worker's slots are still counted...
    assert _admitted_after(gw, key, 75) is not None   # ...and free themselves (2 x 25 s epochs at most)
