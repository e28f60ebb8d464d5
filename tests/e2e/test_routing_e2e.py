"""Routes, key pools, fallback models, retries and cool-downs, through the gateway under gunicorn, with the OpenAI
SDK (its own retries off) as the caller and several fake providers on 127.0.0.1 that fail in each way: refused,
429 with Retry-After, 503, hanging past the read timeout, cut mid-stream, 401 for one key of a pool."""
from __future__ import annotations

import calendar
import http.server
import json
import socket
import textwrap
import threading
import time
import uuid
from decimal import Decimal

import openai
import pytest
import requests

from app.accounting.billing import prompt_upper_bound
from app.accounting.credits import cost
from support import Database
from support import Gateway
from support import flush_redis
from support import free_port
from support import ledger_check

MSG = [{"role": "user", "content": "hello there"}]
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
#: The prices of the models below, credits per 1M tokens.
ROUTED_IN, ROUTED_OUT = Decimal(1000), Decimal(2000)
BACKUP_IN, BACKUP_OUT = Decimal(3000), Decimal(5000)


class Fake:
    """A fake provider on 127.0.0.1: ``mode`` is ok, status (``status`` + ``headers``), hang or cut (a stream
    cut after two events); a key in ``bad_keys`` gets 401; ``no_models`` makes ``GET /models`` a 404. Every
    chat call is recorded as (key, upstream model, stream)."""

    def __init__(self, name: str, mode: str = "ok", status: int = 200, headers: dict | None = None,
                 bad_keys: tuple = (), no_models: bool = False) -> None:
        self.name, self.mode, self.status, self.headers = name, mode, status, headers or {}
        self.bad_keys, self.no_models = set(bad_keys), no_models
        self.calls: list[tuple[str, str, bool]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, obj: dict, extra: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if fake.no_models:
                    self._send(404, {"error": {"message": "no such route"}})
                elif key in fake.bad_keys:
                    self._send(401, {"error": {"message": f"Incorrect API key provided: {key}"}})
                else:
                    self._send(200, {"object": "list", "data": []})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                stream = bool(body.get("stream"))
                fake.calls.append((key, body["model"], stream))
                if key in fake.bad_keys:
                    return self._send(401, {"error": {"message": "Incorrect API key provided"}})
                if fake.mode == "status":
                    return self._send(fake.status, {"error": {"message": f"{fake.name} says no"}}, fake.headers)
                if fake.mode == "hang":
                    time.sleep(4)
                    return
                content = f"from {fake.name}"
                if not stream:
                    return self._send(200, {
                        "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": "stop"}], "usage": USAGE})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                events = [{"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "delta": {"content": word + " "}}]}
                          for word in content.split()]
                events.append({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                               "choices": [], "usage": USAGE})
                for i, ev in enumerate(events):
                    if fake.mode == "cut" and i == 2:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    data = b"data: " + json.dumps(ev).encode() + b"\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    time.sleep(0.05)
                data = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes():
    made: list[Fake] = []

    def make(*args, **kw) -> Fake:
        made.append(Fake(*args, **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def provider(name: str, url: str, keys) -> str:
    return f'\n[providers.{name}]\nbase_url = "{url}"\napi_key_env = {json.dumps(keys)}\n'


def start(tmp_path, catalog: str, env: dict, **kw) -> Gateway:
    tmp = tmp_path / f"gw-{uuid.uuid4().hex[:6]}"
    kw.setdefault("ratelimit_storage", f"sqlite:///{tmp / 'ratelimit.db'}")    # its own counters and cool-downs
    return Gateway(tmp, "http://127.0.0.1:9/v1", catalog_extra=catalog, env=env, **kw).start()


def raw_chat(gw: Gateway, key: str, model: str, **kw):
    return gw.client(key).chat.completions.with_raw_response.create(model=model, messages=MSG, max_tokens=50, **kw)


def ledger_rows(database_url: str) -> list:
    from app.store.models import Usage
    from app.store.models import db
    from app.store.models import make_database
    db.initialize(make_database(database_url))
    with db.connection_context():
        rows = list(Usage.select().order_by(Usage.id))
    db.close()
    return rows


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_every_failure_is_tried_past_and_the_answering_model_is_charged_once(kind, tmp_path, fakes):
    dead = f"http://127.0.0.1:{free_port()}/v1"                                  # nothing listens: refused
    limited = fakes("limited", "status", 429, {"Retry-After": "120"})
    down = fakes("down", "status", 503)
    good = fakes("good", bad_keys=("bad-key",))
    catalog = (provider("dead", dead, "K_DEAD") + provider("limited", limited.url, "K_LIMITED")
               + provider("down", down.url, "K_DOWN") + provider("good", good.url, ["K_BAD", "K_GOOD"])
               + textwrap.dedent(f"""
                 [models."routed"]
                 input_price = {ROUTED_IN}
                 output_price = {ROUTED_OUT}
                 routes = [{{ provider = "dead", upstream_model = "dead-up" }},
                           {{ provider = "limited", upstream_model = "limited-up" }},
                           {{ provider = "down", upstream_model = "down-up" }}]
                 fallback_models = ["backup"]

                 [models."backup"]
                 input_price = {BACKUP_IN}
                 output_price = {BACKUP_OUT}
                 routes = [{{ provider = "good", upstream_model = "good-up" }}]

                 [routing]
                 attempts = 6
                 cooldown_seconds = 30
                 """))
    database = Database(kind, tmp_path)
    try:
        gw = start(tmp_path, catalog, {"K_DEAD": "dead-key", "K_LIMITED": "limited-key", "K_DOWN": "down-key",
                                       "K_BAD": "bad-key", "K_GOOD": "good-key"},
                   database_url=database.url, workers=1, rpd=100)
        try:
            key = gw.create_key("payer", credit=1000)
            first = raw_chat(gw, key, "routed")
            answer = first.parse()
            assert answer.choices[0].message.content == "from good"
            assert (first.headers["X-Boundless-Model"], first.headers["X-Boundless-Route"],
                    first.headers["X-Boundless-Upstream-Model"]) == ("backup", "good", "good-up")
            assert limited.calls == [("limited-key", "limited-up", False)]    # each upstream model as its route says
            assert down.calls == [("down-key", "down-up", False)]
            assert good.calls[-1] == ("good-key", "good-up", False)
            calls_first = 1 + len(limited.calls) + len(down.calls) + len(good.calls)     # +1: the refused one

            # Everything that failed is cooling down now: the next request goes straight to the good key.
            second = raw_chat(gw, key, "routed")
            assert second.parse().choices[0].message.content == "from good"
            assert len(limited.calls) == 1 and len(down.calls) == 1
            assert [c[0] for c in good.calls].count("bad-key") <= 1 and good.calls[-1][0] == "good-key"
            # the caller's request counted once each, however many calls it took
            assert int(first.headers["X-RateLimit-Remaining-RPD"]) == 99
            assert int(second.headers["X-RateLimit-Remaining-RPD"]) == 98

            health = requests.get(gw.base_url + "/providers", headers={"Authorization": f"Bearer {key}"},
                                  timeout=10).json()
            states = {p["name"]: [k["state"] for k in p["keys"]] for p in health["providers"]}
            assert states["limited"] == ["cooling_down"] and states["good"][1] == "ok"
            routes = {r["provider"]: r for r in next(m for m in health["models"] if m["id"] == "routed")["routes"]}
            assert routes["dead"]["state"] == routes["down"]["state"] == routes["limited"]["state"] == "cooling_down"
            assert "127.0.0.1" not in json.dumps(health) and "good-key" not in json.dumps(health)
            assert "K_GOOD" not in json.dumps(health)
            until = calendar.timegm(time.strptime(routes["limited"]["until"], "%Y-%m-%dT%H:%M:%SZ"))
            assert until - time.time() > 60      # the provider's Retry-After (120 s), not cooldown_seconds (30 s)

            metrics = requests.get(gw.url + "/metrics", timeout=10).text
            assert 'boundless_upstream_retries_total{provider="good",upstream_model="good-up"}' in metrics
            assert 'boundless_upstream_cooldowns_total{kind="key",provider="limited"}' in metrics
            assert 'reason="http_503"' in metrics and 'reason="refused"' in metrics
            lines = [json.loads(line) for line in gw.log().splitlines() if '"boundless.access"' in line
                     and '"/api/v1/chat/completions"' in line]
            assert [len(line["attempts"]) for line in lines] == [calls_first, 1]
            assert [a["result"] for a in lines[0]["attempts"]][:3] == ["refused", "http_429", "http_503"]
        finally:
            gw.stop()

        rows = ledger_rows(database.url)
        assert [(r.model, r.answered_model, r.provider, r.attempts, r.state) for r in rows] == [
            ("routed", "backup", "good", calls_first, "settled"), ("routed", "backup", "good", 1, "settled")]
        # reserved for the priciest model that may answer (the fallback), charged at the answering one's prices
        body = {"model": "routed", "messages": MSG, "max_tokens": 50}
        assert rows[0].reserved == cost(prompt_upper_bound(body), 50, BACKUP_IN, BACKUP_OUT)
        assert [r.charge for r in rows] == [cost(10, 5, BACKUP_IN, BACKUP_OUT)] * 2
        balances = ledger_check(database.url)
        assert balances["payer"] == (1000 * 10**6 - 2 * cost(10, 5, BACKUP_IN, BACKUP_OUT),
                                     2 * cost(10, 5, BACKUP_IN, BACKUP_OUT))
    finally:
        database.drop()


def test_timeouts_cuts_cooling_and_missing_keys(tmp_path, fakes):
    hang, cutter = fakes("hang", "hang"), fakes("cutter", "cut")
    down_a, down_b = fakes("down_a", "status", 503), fakes("down_b", "status", 502)
    good, unused = fakes("good"), fakes("unused")
    catalog = (provider("hang", hang.url, "K") + provider("cutter", cutter.url, "K")
               + provider("down_a", down_a.url, "K") + provider("down_b", down_b.url, "K")
               + provider("good", good.url, "K") + provider("nokey", unused.url, ["NOT_SET_A", "NOT_SET_B"])
               + textwrap.dedent("""
                 [models."slow"]
                 routes = [{ provider = "hang", upstream_model = "slow-up" }, { provider = "good" }]
                 [models."cutting"]
                 input_price = 1000
                 output_price = 2000
                 routes = [{ provider = "cutter" }, { provider = "good" }]
                 [models."doomed"]
                 routes = [{ provider = "down_a" }, { provider = "down_b" }]
                 [models."keyless"]
                 routes = [{ provider = "nokey" }]
                 """))
    gw = start(tmp_path, catalog, {"K": "the-key", "BOUNDLESS_UPSTREAM_READ_TIMEOUT": "1"}, workers=1)
    try:
        key = gw.create_key("k", credit=100)
        client = gw.client(key)

        # a route that does not answer in time: the next route answers
        out = client.chat.completions.create(model="slow", messages=MSG, max_tokens=5)
        assert out.choices[0].message.content == "from good" and len(hang.calls) == 1

        # a stream cut after its first events is never retried: the caller sees the cut
        with pytest.raises(openai.APIError):
            for _ in client.chat.completions.create(model="cutting", messages=MSG, max_tokens=5, stream=True):
                pass
        assert len(cutter.calls) == 1 and good.calls.count(("the-key", "cutting", True)) == 0

        # every route failing: the last answer's error; then every route cooling: 503 at once, no call
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="doomed", messages=MSG, max_tokens=5)
        assert err.value.status_code == 502 and len(down_a.calls) == len(down_b.calls) == 1
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="doomed", messages=MSG, max_tokens=5)
        assert err.value.status_code == 503 and err.value.code == "upstream_cooling_down"
        assert 1 <= int(err.value.response.headers["Retry-After"]) <= 30
        assert len(down_a.calls) == len(down_b.calls) == 1

        # a model whose every key variable is unset: not listed, 503 naming them, never called unauthenticated
        assert "keyless" not in [m.id for m in client.models.list().data]
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="keyless", messages=MSG, max_tokens=5)
        assert err.value.status_code == 503 and "NOT_SET_A" in err.value.message and "NOT_SET_B" in err.value.message
        assert unused.calls == []
    finally:
        gw.stop()
    log = gw.log()
    assert "boundless: warning: provider 'nokey' has no key: NOT_SET_A, NOT_SET_B are not set" in log
    rows = ledger_rows(gw.database_url)
    cut = next(r for r in rows if r.model == "cutting")
    assert (cut.provider, cut.attempts, cut.outcome) == ("cutter", 1, "upstream_cut")
    ledger_check(gw.database_url)


def test_two_instances_on_redis_share_cool_downs(tmp_path, fakes):
    down, good = fakes("down", "status", 503), fakes("good")
    catalog = (provider("down", down.url, "K") + provider("good", good.url, "K") + textwrap.dedent("""
        [models."shared"]
        routes = [{ provider = "down" }, { provider = "good" }]
        """))
    storage = flush_redis(13)
    gw1 = start(tmp_path, catalog, {"K": "k"}, ratelimit_storage=storage, workers=1)
    gw2 = Gateway(tmp_path / "gw2", "http://127.0.0.1:9/v1", catalog_extra=catalog, env={"K": "k"},
                  ratelimit_storage=storage, database_url=gw1.database_url, workers=2).start()
    try:
        key = gw1.create_key("k")
        assert gw1.client(key).chat.completions.create(model="shared", messages=MSG).choices[0].message.content \
            == "from good"
        assert len(down.calls) == 1
        # the other instance sees the cool-down (read from Redis at most a second late) ...
        deadline = time.monotonic() + 10
        state = None
        while time.monotonic() < deadline:
            health = requests.get(gw2.base_url + "/providers", headers={"Authorization": f"Bearer {key}"},
                                  timeout=10).json()
            state = health["models"][[m["id"] for m in health["models"]].index("shared")]["routes"][0]["state"]
            if state == "cooling_down":
                break
            time.sleep(0.2)
        assert state == "cooling_down"
        # ... and its workers skip the route without calling it
        for _ in range(4):
            assert gw2.client(key).chat.completions.create(model="shared", messages=MSG).choices[0].message.content \
                == "from good"
        assert len(down.calls) == 1
    finally:
        gw2.stop()
        gw1.stop()
        flush_redis(13)


def test_providers_check(tmp_path, fakes):
    good, plain, locked = fakes("good"), fakes("plain", no_models=True), fakes("locked", bad_keys=("bad",))
    catalog = (provider("good", good.url, "K") + provider("plain", plain.url, "K")
               + provider("locked", locked.url, ["K", "K_BAD", "K_UNSET"]) + textwrap.dedent("""
                 [models."m"]
                 routes = [{ provider = "good" }, { provider = "plain", upstream_model = "plain-up" }]
                 [models."n"]
                 routes = [{ provider = "locked" }]
                 """))
    gw = Gateway(tmp_path / "gw", "http://127.0.0.1:9/v1", catalog_extra=catalog, env={"K": "sk-fine", "K_BAD": "bad"})
    res = gw.cli("providers", "check", "--json", check=False)
    assert res.returncode == 1
    rows = {(r["provider"], r["key_env"]): r for r in json.loads(res.stdout)}
    assert rows[("good", "K")]["status"] == "ok" and rows[("plain", "K")]["status"] == "ok"
    assert plain.calls == [("sk-fine", "plain-up", False)]                # no /models: a one-token chat instead
    assert rows[("locked", "K")]["status"] == "ok"
    assert rows[("locked", "K_BAD")]["status"] == "failing"
    assert rows[("locked", "K_UNSET")]["error"] == "K_UNSET is not set"
    assert rows[("locked", "K_BAD")]["error"] == "HTTP 401: Incorrect API key provided: ***"    # key masked
    table = gw.cli("providers", "check", "--model", "m", check=False)
    assert table.returncode == 0 and "sk-fine" not in table.stdout
    assert table.stdout.split("\n")[0].split() == ["PROVIDER", "KEY", "STATUS", "LATENCY", "ERROR"]
    assert {tuple(line.split()[:3]) for line in table.stdout.strip().split("\n")[1:]} == {
        ("good", "K", "ok"), ("plain", "K", "ok")}


def test_a_key_never_falls_back_to_a_model_it_may_not_call(tmp_path, fakes):
    """A key limited to `routed` (keys --models) gets the failing route's error, not the fallback's answer: the
    fallback is outside its allow-list; a key allowed both falls back as usual."""
    down = fakes("down", "status", 503)
    good = fakes("good")
    catalog = (provider("down", down.url, "K_DOWN") + provider("good", good.url, "K_GOOD")
               + textwrap.dedent("""
                 [models."routed"]
                 routes = [{ provider = "down", upstream_model = "down-up" }]
                 fallback_models = ["backup"]

                 [models."backup"]
                 routes = [{ provider = "good", upstream_model = "good-up" }]
                 """))
    gw = start(tmp_path, catalog, {"K_DOWN": "down-key", "K_GOOD": "good-key"}, workers=1)
    try:
        narrow = gw.create_key("narrow", models="routed")
        with pytest.raises(openai.InternalServerError) as err:           # the route's 503, as a 502
            raw_chat(gw, narrow, "routed")
        assert err.value.status_code == 502
        assert good.calls == []
        wide = gw.create_key("wide", models="routed,backup")
        assert raw_chat(gw, wide, "routed").headers["X-Boundless-Model"] == "backup"
        assert len(good.calls) == 1
    finally:
        gw.stop()
