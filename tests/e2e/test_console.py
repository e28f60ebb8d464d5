"""The web console in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, installed by
.ci/run) against the gateway under gunicorn, with the fake upstream behind it. Screenshots of the main pages go
to docs/img/ (shown in README.md)."""
from __future__ import annotations

import csv
import io
import os
import re

import pytest
import requests

from support import ROOT
from support import Gateway
from support import ledger_check

CHROMIUM = os.environ.get("BOUNDLESS_TEST_CHROMIUM", "/usr/bin/chromium")
PASSWORD = "correct horse battery"
IMG = ROOT / "docs" / "img"
MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory, mock):
    g = Gateway(tmp_path_factory.mktemp("gw"), mock.url).start()
    g.cli("console", "add-user", "alice", "--password", PASSWORD)
    g.cli("console", "add-user", "mallory", "--password", PASSWORD)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium (see .ci/run)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, gw):
    context = browser.new_context(base_url=gw.url, viewport={"width": 1200, "height": 900},
                                  permissions=["clipboard-read", "clipboard-write"])
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.accept()))
    yield pg
    context.close()


def sign_in(page, user="alice", password=PASSWORD):
    page.goto("/console/")
    page.get_by_label("Name").fill(user)
    page.get_by_label("Password").fill(password)
    return page.get_by_role("button", name="Sign in").click()


def chat(gw, key, model="free-model"):
    return requests.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": model, "messages": MSG}, timeout=30)


def create_in_console(page, name, **fields):
    page.goto("/console/keys")
    if not page.get_by_label("Name", exact=True).is_visible():
        page.get_by_text("Create a key").click()
    page.get_by_label("Name", exact=True).fill(name)
    for label, value in fields.items():
        page.get_by_label(label).fill(value)
    page.get_by_role("button", name="Create").click()


def test_sign_in_create_copy_use_revoke(page, gw):
    sign_in(page)
    assert page.get_by_role("heading", name="Overview").is_visible()
    create_in_console(page, "team-web", **{"Credit": "2"})
    shown = page.locator("#new-key").inner_text().strip()
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", shown)
    page.get_by_role("button", name="Copy").click()
    page.get_by_text("Copied", exact=True).first.wait_for()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == shown
    assert chat(gw, copied).status_code == 200                    # the copied key works

    # never shown again: not on the key's page, not in the list
    page.goto("/console/keys?q=team-web")
    assert shown not in page.content() and shown[:8] + "..." in page.content()
    page.get_by_role("link", name="team-web").click()
    assert shown not in page.content()
    page.screenshot(path=str(IMG / "console-key.png"), full_page=True)

    page.get_by_role("button", name="Revoke").click()             # confirms first (a dialog, accepted)
    assert page.dialogs and "Revoke the key team-web" in page.dialogs[-1]
    page.get_by_text("Revoked: the key is refused").wait_for()
    got = chat(gw, copied)
    assert got.status_code == 401 and got.json()["error"]["code"] == "invalid_api_key"
    page.goto("/console/audit")
    assert page.locator("tr", has_text="key.revoke").filter(has_text="team-web").filter(
        has_text="console:alice").count() == 1
    ledger_check(gw.database_url)


def test_top_up_and_edit_limits(page, gw):
    gw.create_key("topped", credit="1")
    sign_in(page)
    page.goto("/console/key?name=topped")
    page.get_by_label("Credits to add").fill("2.5")
    page.get_by_role("button", name="Top up").click()
    assert page.get_by_test_id("balance").inner_text() == "3.5"
    page.get_by_label("Requests per minute").fill("7")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Saved.").wait_for()
    assert "7" in page.locator("dd", has_text="left").first.inner_text()
    page.get_by_label("Requests per minute").fill("lots")
    page.get_by_role("button", name="Save").click()
    assert page.get_by_role("alert").inner_text().startswith("rpm must be a positive number")
    info = requests.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {gw.create_key()}"}, timeout=10)
    assert info.status_code == 200
    listed = {r["name"]: r for r in __import__("json").loads(gw.cli("keys", "list", "--json").stdout)}
    assert (listed["topped"]["balance"], listed["topped"]["rpm"]) == ("3.5", 7)
    ledger_check(gw.database_url)


def test_usage_report_filters_chart_and_csv(page, gw):
    key = gw.create_key("reported", credit="1")
    for model in ("free-model", "free-model", "paid-model"):
        assert chat(gw, key, model).status_code == 200
    sign_in(page)
    # the overview's charts render: 30 bars each, today's not empty
    page.goto("/console/")
    chart = page.locator("svg.chart").first
    assert chart.is_visible() and chart.locator("rect.bar").count() == 30
    assert float(chart.locator("rect.bar").last.get_attribute("height")) > 0
    page.screenshot(path=str(IMG / "console-overview.png"), full_page=True)
    page.goto("/console/keys")
    page.screenshot(path=str(IMG / "console-keys.png"), full_page=True)

    page.goto("/console/usage")
    page.locator("select[name=by]").select_option("model")
    page.locator("input[name=key]").fill("reported")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    rows = page.locator("table tbody tr")
    assert rows.count() == 2
    assert [c.strip() for c in rows.nth(0).locator("td").all_inner_texts()][:2] == ["free-model", "2"]
    assert [c.strip() for c in rows.nth(1).locator("td").all_inner_texts()][:2] == ["paid-model", "1"]
    assert page.locator("svg.chart rect.bar").count() == 2
    page.screenshot(path=str(IMG / "console-usage.png"), full_page=True)
    with page.expect_download() as info:
        page.get_by_role("link", name="Download CSV").click()
    table = list(csv.DictReader(io.StringIO(open(info.value.path()).read())))
    assert [(r["model"], r["requests"]) for r in table] == [("free-model", "2"), ("paid-model", "1")]
    cli = __import__("json").loads(gw.cli("usage", "--by", "model", "--key", "reported", "--json").stdout)
    assert [r["credits"] for r in table] == [r["credits"] for r in cli]
    # the ledger: search by request id
    rid = chat(gw, key).headers["X-Request-Id"]
    page.goto("/console/ledger")
    page.get_by_label("Request id").fill(rid)
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    assert page.locator("table tbody tr").count() == 1 and rid in page.locator("table tbody").inner_text()


def test_five_wrong_passwords_are_throttled(page, gw):
    for _ in range(5):
        sign_in(page, "mallory", "not the password")
        assert page.get_by_role("alert").inner_text() == "Wrong name or password."
    sign_in(page, "mallory", PASSWORD)                 # even the right password, for a while
    assert page.get_by_role("alert").inner_text().startswith("Too many failed sign-in attempts")
    resp = page.request.get("/console/signin")
    assert resp.status == 200                          # the form itself is not throttled


def test_self_service_shows_only_its_own_key(page, gw):
    mine = gw.create_key("holder-a", credit="1.25")
    gw.create_key("holder-b", credit="9")
    assert chat(gw, mine).status_code == 200
    page.goto("/console/me")
    page.get_by_label("Key").fill("sk-" + "x" * 43)
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "This key is unknown or revoked."
    page.get_by_label("Key").fill(mine)
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("heading", name=re.compile("My key")).inner_text().startswith("My key “holder-a”")
    assert page.get_by_test_id("balance").inner_text() == "1.25"
    text = page.content()
    assert "holder-b" not in text and mine not in text and "Keys" not in page.locator("header").inner_text()
    assert page.locator("svg.chart rect.bar").count() == 30
    page.screenshot(path=str(IMG / "console-me.png"), full_page=True)
    for path in ("/console/", "/console/keys", "/console/key?name=holder-b", "/console/ledger", "/console/audit"):
        page.goto(path)
        assert "/console/signin" in page.url and "holder-b" not in page.locator("main").inner_text(), path


def test_a_script_in_a_key_name_renders_as_text(page, gw):
    sign_in(page)
    name = "<script>alert(1)</script>"
    create_in_console(page, name)
    assert page.get_by_role("heading", name=re.compile("created")).inner_text() == f"Key “{name}” created"
    page.goto("/console/keys")
    page.get_by_role("link", name=name).click()
    assert name in page.get_by_role("heading").first.inner_text()
    page.goto("/console/audit")
    assert page.locator("td", has_text=name).count() >= 1
    assert page.dialogs == []                          # no alert ran anywhere
    assert "<script>alert(1)</script>" not in page.content().replace(page.locator("head").inner_html(), "")


def test_a_form_without_its_csrf_token_is_refused(page, gw):
    sign_in(page)
    page.goto("/console/keys")
    page.get_by_text("Create a key").click()
    page.get_by_label("Name", exact=True).fill("forged")
    page.evaluate("document.querySelectorAll('input[name=csrf_token]').forEach(e => e.remove())")
    page.get_by_role("button", name="Create").click()
    assert page.get_by_role("alert").inner_text().startswith("The form was not sent from this page")
    assert "forged" not in gw.cli("keys", "list").stdout
    # and a cross-site POST with the session cookie but no token changes nothing either
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    forged = requests.post(gw.url + "/console/keys", data={"name": "forged2"}, cookies=cookies, timeout=10,
                           allow_redirects=False)
    assert forged.status_code == 400 and "forged2" not in gw.cli("keys", "list").stdout


def test_providers_page_shows_every_route_and_its_state(page, gw):
    sign_in(page)
    page.goto("/console/providers")
    rows = page.locator("h2:has-text('Routes') + p + div table tbody tr")
    cells = {tuple(rows.nth(i).locator("td").all_inner_texts()[:5]) for i in range(rows.count())}
    assert ("paid-model", "mock", "mock-paid", "", "ok") in cells, cells
    assert ("free-model", "mock", "mock-model", "", "ok") in cells, cells
    assert "sk-" not in page.content() and "MOCK_PROVIDER_KEY" not in page.content()   # no key, no key variable
    page.screenshot(path=str(IMG / "console-providers.png"), full_page=True)


def test_headers_cookies_and_console_off(gw, tmp_path, mock):
    page = requests.get(gw.url + "/console/signin", timeout=10)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "<script>" not in page.text.replace('<script src="/console/static/console.js" defer></script>', "")
    cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    over_https = requests.get(gw.url + "/console/signin", headers={"X-Forwarded-Proto": "https"}, timeout=10)
    assert "Secure" in over_https.headers["Set-Cookie"]
    assert requests.get(gw.url + "/console/static/console.js", timeout=10).status_code == 200
    off = Gateway(tmp_path / "off", mock.url, env={"BOUNDLESS_CONSOLE": "0"}).start()
    try:
        assert requests.get(off.url + "/console/", timeout=10).status_code == 404
        assert requests.get(off.url + "/console/signin", timeout=10).status_code == 404
    finally:
        off.stop()
