"""The admin API (/api/v1/keys, /usage, /ledger, /audit) end to end: gunicorn + the fake upstream, with
`requests` as the client, each refusal with its status and code."""
from __future__ import annotations

import csv
import io
import json
import re

import pytest
import requests

from support import Gateway
from support import ledger_check

MSG = [{"role": "user", "content": "hello there"}]

#: A model so cheap that one request costs less than 0.0001 credits: a float would print 5.6e-05.
CHEAP = """
[models."cheap-model"]
provider = "mock"
upstream_model = "mock-cheap"
input_price = 1
output_price = 10
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, mock):
    g = Gateway(tmp_path_factory.mktemp("gw"), mock.url, catalog_extra=CHEAP).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def admin(gw):
    return gw.create_key("root", admin=True)


def call(gw, method, path, bearer, body=None, **params):
    return requests.request(method, f"{gw.base_url}{path}", headers={"Authorization": f"Bearer {bearer}"},
                            json=body, params=params, timeout=30)


def refused(resp, status, code, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert not re.search(r"sk-[A-Za-z0-9_-]{20}", resp.text)      # never a key
    return err


def chat(gw, key, model="free-model"):
    return requests.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": model, "messages": MSG}, timeout=30)


def test_admin_keys_administer_and_never_chat(gw, admin):
    normal = gw.create_key()
    # an admin key: the admin API only
    refused(chat(gw, admin), 403, "admin_key")
    refused(call(gw, "GET", "/models", admin), 403, "admin_key")
    refused(call(gw, "GET", "/key", admin), 403, "admin_key")
    assert call(gw, "GET", "/keys", admin).status_code == 200
    # a normal key: never the admin API, whatever the route or method
    for method, path in (("GET", "/keys"), ("POST", "/keys"), ("GET", "/keys/root"), ("PATCH", "/keys/root"),
                         ("DELETE", "/keys/root"), ("POST", "/keys/root/topup"), ("GET", "/usage"),
                         ("GET", "/ledger"), ("GET", "/audit")):
        refused(call(gw, method, path, normal, {"rpm": 1}), 403, "not_admin")
    assert call(gw, "GET", "/keys/root", admin).json()["data"]["state"] == "active"   # nothing changed
    # no key, or an unknown one: 401 as everywhere
    refused(requests.get(gw.base_url + "/keys", timeout=10), 401, "invalid_api_key")
    refused(call(gw, "GET", "/keys", "sk-" + "x" * 43), 401, "invalid_api_key")
    # listed like any key, and marked
    listed = {r["name"]: r for r in json.loads(gw.cli("keys", "list", "--json").stdout)}
    assert listed["root"]["admin"] is True and listed[next(iter(listed.keys() - {"root"}))]["admin"] is False


def test_create_get_list_update_topup_revoke(gw, admin):
    made = call(gw, "POST", "/keys", admin, {"name": "team-a", "rpm": 5, "rpd": "none", "credit": "2.5"})
    assert made.status_code == 201, made.text
    data = made.json()["data"]
    key = data["key"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", key) and data["prefix"] == key[:8] + "..."
    assert (data["name"], data["rpm"], data["rpd"], data["balance"], data["state"]) == ("team-a", 5, None, "2.5",
                                                                                         "active")
    assert chat(gw, key).status_code == 200
    # shown once: never again, by any route
    got = call(gw, "GET", "/keys/team-a", admin)
    assert got.status_code == 200 and key not in got.text and "key" not in got.json()["data"]
    assert key not in call(gw, "GET", "/keys", admin, limit=1000).text

    # the refusals of a create, each changing nothing
    refused(call(gw, "POST", "/keys", admin, {"name": "team-a"}), 409, "key_exists", "name")
    refused(call(gw, "POST", "/keys", admin, {"rpm": 3}), 400, "invalid_request", "name")
    refused(call(gw, "POST", "/keys", admin, {"name": "b", "rpm": 0}), 400, "invalid_request", "rpm")
    refused(call(gw, "POST", "/keys", admin, {"name": "b", "rpm": True}), 400, "invalid_request", "rpm")
    refused(call(gw, "POST", "/keys", admin, {"name": "b", "budget": "5"}), 400, "invalid_request", "budget_period")
    refused(call(gw, "POST", "/keys", admin, {"name": "b", "budget_period": "day"}), 400, "invalid_request", "budget")
    refused(call(gw, "POST", "/keys", admin, {"name": "b", "credit": "1.0000001"}), 400, "invalid_request",
            "credit")
    refused(call(gw, "POST", "/keys", admin, {"name": "b", "credit": -1}), 400, "invalid_request", "credit")
    refused(call(gw, "POST", "/keys", admin, {"name": "b", "colour": "red"}), 400, "invalid_request", "colour")
    refused(call(gw, "POST", "/keys", admin, {"name": "b", "disabled": True}), 400, "invalid_request", "disabled")
    refused(call(gw, "POST", "/keys", admin, [1, 2]), 400, "invalid_request")
    refused(requests.post(gw.base_url + "/keys", data="{nope", timeout=10,
                          headers={"Authorization": f"Bearer {admin}"}), 400, "invalid_request")
    assert call(gw, "GET", "/keys/b", admin).status_code == 404

    # update: limits back to the catalogue's, balance set, then disabled
    patched = call(gw, "PATCH", "/keys/team-a", admin, {"rpm": "default", "credit": 4})
    assert patched.status_code == 200, patched.text
    assert (patched.json()["data"]["rpm"], patched.json()["data"]["rpm_default"]) == (20, True)
    assert patched.json()["data"]["balance"] == "4"
    refused(call(gw, "PATCH", "/keys/team-a", admin, {}), 400, "invalid_request")
    refused(call(gw, "PATCH", "/keys/team-a", admin, {"rpm": -2}), 400, "invalid_request", "rpm")
    refused(call(gw, "PATCH", "/keys/team-a", admin, {"disabled": "yes"}), 400, "invalid_request", "disabled")
    refused(call(gw, "PATCH", "/keys/nobody", admin, {"rpm": 2}), 404, "key_not_found")
    assert call(gw, "PATCH", "/keys/team-a", admin, {"disabled": True}).json()["data"]["state"] == "disabled"
    refused(chat(gw, key), 401, "key_disabled")
    assert call(gw, "PATCH", "/keys/team-a", admin, {"disabled": False}).json()["data"]["state"] == "active"
    assert chat(gw, key).status_code == 200

    # top-up
    topped = call(gw, "POST", "/keys/team-a/topup", admin, {"amount": "0.000059"})
    assert topped.status_code == 200 and topped.json()["data"]["balance"] == "4.000059"
    for bad in (0, -1, "lots", None, "1e400"):
        refused(call(gw, "POST", "/keys/team-a/topup", admin, {"amount": bad}), 400, "invalid_request", "amount")
    refused(call(gw, "POST", "/keys/team-a/topup", admin, {}), 400, "invalid_request", "amount")
    refused(call(gw, "POST", "/keys/nobody/topup", admin, {"amount": 1}), 404, "key_not_found")
    assert call(gw, "GET", "/keys/team-a", admin).json()["data"]["balance"] == "4.000059"

    # revoke: refused at once (no key cache in the tests), listed as revoked, its ledger rows kept
    gone = call(gw, "DELETE", "/keys/team-a", admin)
    assert gone.status_code == 200 and gone.json()["data"]["state"] == "revoked"
    refused(chat(gw, key), 401, "invalid_api_key")
    refused(call(gw, "PATCH", "/keys/team-a", admin, {"rpm": 3}), 409, "key_revoked")
    refused(call(gw, "POST", "/keys/team-a/topup", admin, {"amount": 1}), 409, "key_revoked")
    assert call(gw, "DELETE", "/keys/team-a", admin).status_code == 200          # already revoked: no change
    refused(call(gw, "DELETE", "/keys/nobody", admin), 404, "key_not_found")
    assert len(call(gw, "GET", "/ledger", admin, key="team-a").json()["data"]) == 2
    ledger_check(gw.database_url)


def test_list_is_paginated(gw, admin):
    for i in range(5):
        assert call(gw, "POST", "/keys", admin, {"name": f"page-{i}"}).status_code == 201
    first = call(gw, "GET", "/keys", admin, limit=2, offset=0, search="page-").json()
    second = call(gw, "GET", "/keys", admin, limit=2, offset=2, search="page-").json()
    third = call(gw, "GET", "/keys", admin, limit=2, offset=4, search="page-").json()
    assert first["total"] == 5
    assert [r["name"] for r in first["data"] + second["data"] + third["data"]] == [f"page-{i}" for i in range(5)]
    refused(call(gw, "GET", "/keys", admin, limit=0), 400, "invalid_request", "limit")
    refused(call(gw, "GET", "/keys", admin, offset=-1), 400, "invalid_request", "offset")


def test_usage_is_what_the_cli_prints_and_amounts_have_no_exponent(gw, admin):
    made = call(gw, "POST", "/keys", admin, {"name": "cheap", "credit": 1}).json()["data"]
    # one request costs 6 prompt tokens x 1 + 5 completion tokens x 10 = 56 micro-credits (a float: 5.6e-05)
    assert chat(gw, made["key"], "cheap-model").status_code == 200
    info = requests.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {made['key']}"}, timeout=10)
    assert '"spent":"0.000056"' in info.text.replace(" ", "") and info.json()["data"]["balance"] == "0.999944"
    for _ in range(2):
        assert chat(gw, made["key"], "cheap-model").status_code == 200
    for by in ("day", "model", "key"):
        api = call(gw, "GET", "/usage", admin, by=by, key="cheap")
        assert api.status_code == 200
        cli = json.loads(gw.cli("usage", "--by", by, "--key", "cheap", "--json").stdout)
        assert api.json()["data"] == cli and cli[0]["credits"] == "0.000168"
    # the same filters as the CLI, and the same refusals
    assert call(gw, "GET", "/usage", admin, by="model", model="cheap-model").json()["data"][0]["requests"] == 3
    refused(call(gw, "GET", "/usage", admin, by="week"), 400, "invalid_request", "by")
    refused(call(gw, "GET", "/usage", admin, key="nobody"), 404, "key_not_found", "key")
    refused(call(gw, "GET", "/usage", admin, model="no-such-model"), 404, "model_not_found", "model")
    refused(call(gw, "GET", "/usage", admin, since="yesterday"), 400, "invalid_request", "since")
    assert call(gw, "GET", "/usage", admin, since="2000-01-01", until="2000-01-02").json()["data"] == []
    # no amount anywhere is written with an exponent
    for path, params in (("/usage", {"key": "cheap"}), ("/ledger", {"key": "cheap"}), ("/keys/cheap", {}),
                         ("/keys", {"search": "cheap"})):
        text = call(gw, "GET", path, admin, **params).text
        assert not re.search(r'[:,\[]\s*"?-?\d+(?:\.\d+)?[eE][-+]?\d', text), text   # a number or amount
    assert "0.000056" in call(gw, "GET", "/ledger", admin, key="cheap").text


def test_ledger_newest_first_with_a_cursor_and_csv(gw, admin):
    made = call(gw, "POST", "/keys", admin, {"name": "ledgered", "credit": 1}).json()["data"]
    ids = [chat(gw, made["key"], "cheap-model").headers["X-Request-Id"] for _ in range(3)]
    first = call(gw, "GET", "/ledger", admin, key="ledgered", limit=2).json()
    assert [r["request_id"] for r in first["data"]] == ids[::-1][:2] and first["next_cursor"]
    rest = call(gw, "GET", "/ledger", admin, key="ledgered", limit=2, cursor=first["next_cursor"]).json()
    assert [r["request_id"] for r in rest["data"]] == ids[:1] and rest["next_cursor"] is None
    row = rest["data"][0]
    assert (row["key"], row["model"], row["state"], row["status"], row["charge"]) == (
        "ledgered", "cheap-model", "settled", 200, "0.000056")
    one = call(gw, "GET", "/ledger", admin, request_id=ids[1]).json()["data"]
    assert [r["request_id"] for r in one] == [ids[1]]
    assert call(gw, "GET", "/ledger", admin, key="ledgered", status="502").json()["data"] == []
    assert len(call(gw, "GET", "/ledger", admin, key="ledgered", status="complete").json()["data"]) == 3
    got = call(gw, "GET", "/ledger", admin, key="ledgered", format="csv")
    assert got.status_code == 200 and got.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in got.headers["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(got.text)))
    assert [r["request_id"] for r in table] == ids[::-1] and table[0]["charge"] == "0.000056"
    refused(call(gw, "GET", "/ledger", admin, cursor="abc"), 400, "invalid_request", "cursor")
    refused(call(gw, "GET", "/ledger", admin, limit=5000), 400, "invalid_request", "limit")


def test_every_change_is_in_the_audit_log(gw, admin):
    call(gw, "POST", "/keys", admin, {"name": "audited", "rpm": 7})
    call(gw, "PATCH", "/keys/audited", admin, {"rpd": 9})
    call(gw, "POST", "/keys/audited/topup", admin, {"amount": "1.5"})
    call(gw, "DELETE", "/keys/audited", admin)
    call(gw, "PATCH", "/keys/audited", admin, {"rpd": 10})      # refused: not a change, not in the log
    log = call(gw, "GET", "/audit", admin, target="audited").json()["data"]
    assert [(e["actor"], e["action"], e["detail"]) for e in log] == [
        ("key:root", "key.revoke", {}), ("key:root", "key.topup", {"amount": "1.5"}),
        ("key:root", "key.update", {"rpd": 9}), ("key:root", "key.create", {"rpm": 7})]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["at"]) for e in log)
    cli = json.loads(gw.cli("audit", "--target", "audited", "--json").stdout)
    assert cli == log
    assert "key.topup" in gw.cli("audit").stdout
    refused(call(gw, "GET", "/audit", admin, limit="x"), 400, "invalid_request", "limit")


def test_a_revoked_admin_key_is_refused(gw, admin):
    other = gw.create_key("root2", admin=True)
    assert call(gw, "GET", "/keys", other).status_code == 200
    assert call(gw, "DELETE", "/keys/root2", admin).json()["data"]["state"] == "revoked"
    refused(call(gw, "GET", "/keys", other), 401, "invalid_api_key")
    res = gw.cli("keys", "create", "--name", "x", "--admin", "--credit", "1", check=False)
    assert res.returncode == 1 and "admin" in res.stderr


def test_the_per_key_policy_fields_through_the_admin_api(gw, admin):
    """models, expires, budget, budget_period and max_parallel: set on create, shown, changed, lifted, and
    enforced on the key's own requests; a bad value is a 400 naming its field and changes nothing."""
    body = {"name": "policy-by-api", "credit": "5", "models": ["free-model"], "expires": "30d", "budget": "2",
            "budget_period": "month", "max_parallel": 3}
    made = call(gw, "POST", "/keys", admin, body)
    assert made.status_code == 201, made.text
    key = made.json()["data"]["key"]
    shown = call(gw, "GET", "/keys/policy-by-api", admin).json()["data"]
    assert shown["models"] == ["free-model"] and shown["budget"] == "2" and shown["budget_period"] == "month"
    assert shown["max_parallel"] == 3 and shown["expires_at"].endswith("Z") and shown["state"] == "active"
    assert chat(gw, key).status_code == 200
    refused(chat(gw, key, model="cheap-model"), 403, "model_not_allowed")
    for field, value in (("models", 5), ("expires", "tomorrowish"), ("budget", "-1"), ("budget_period", "year"),
                         ("max_parallel", 0)):
        resp = call(gw, "PATCH", "/keys/policy-by-api", admin, {field: value})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field, (field, resp.text)
    assert call(gw, "GET", "/keys/policy-by-api", admin).json()["data"] == shown      # nothing changed
    lifted = call(gw, "PATCH", "/keys/policy-by-api", admin,
                  {"models": "*", "expires": None, "budget": None, "max_parallel": None})
    assert lifted.status_code == 200, lifted.text
    data = lifted.json()["data"]
    assert (data["models"], data["expires_at"], data["budget"], data["max_parallel"]) == (["*"], None, None, None)
    assert chat(gw, key, model="cheap-model").status_code == 200
    past = call(gw, "PATCH", "/keys/policy-by-api", admin, {"expires": "2020-01-01"})
    assert past.status_code == 200 and past.json()["data"]["state"] == "expired"
    refused(chat(gw, key), 401, "key_expired")
    ledger_check(gw.database_url)
