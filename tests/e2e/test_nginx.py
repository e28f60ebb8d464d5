"""The shipped nginx site (config/nginx.conf) in front of a real gateway: the Debian nginx binary, run as a
private instance on a free port, with the site file read from the repository.

What the test changes in the shipped file, and nothing else (see :func:`site_config`):

* ``server 127.0.0.1:8000;`` (the upstream) becomes the test gateway's port;
* ``listen 80;`` becomes ``listen 127.0.0.1:<free port>;``;
* for the TLS test only: ``listen 80;`` is deleted and the commented TLS lines are uncommented, exactly as the
  file's comments tell an operator to do, with a throw-away self-signed certificate's paths and a free port.

The site file is an nginx *site* (it lives inside ``http { }``), so the test wraps it in a minimal main
configuration: pid, logs and temp paths in the test's directory, ``user root;`` when the test runs as root
(the default ``nobody`` could not write to pytest's 0700 temp directories), and, as an operator's ``http``
block might, ``gzip on`` for every type, to show that the site keeps the API uncompressed all the same.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx2
import openai
import pytest
import requests

from app.store.models import Usage
from app.store.models import db
from app.store.models import make_database
from support import events_with_times
from support import BIN
from support import ROOT
from support import Gateway
from support import free_port
from support import wait_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SHIPPED = ROOT / "config" / "nginx.conf"
MSG = [{"role": "user", "content": "hello there"}]
#: What the gateway logs per request (gunicorn access log): the peer gunicorn sees, then what nginx forwarded.
ACCESS_FORMAT = "%(h)s|%({x-forwarded-for}i)s|%({x-real-ip}i)s|%({x-forwarded-proto}i)s|%({wsgi.url_scheme}e)s|%(U)s"
MAX_BODY = 10 * 1024 * 1024          # the gateway's default BOUNDLESS_MAX_BODY_BYTES

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (apt-get install nginx)")

TLS_LINES = re.compile(r"^    # (listen 443 ssl http2;|ssl_certificate |ssl_certificate_key |ssl_protocols |"
                       r"ssl_session_cache )", re.M)


# --------------------------------------------------------------------------------------------------
# nginx, configured from the shipped file
# --------------------------------------------------------------------------------------------------

def _replace_once(text: str, pattern: str, repl: str) -> str:
    out, n = re.subn(pattern, repl, text, flags=re.M)
    assert n == 1, f"config/nginx.conf: expected exactly one line matching {pattern!r}, found {n}"
    return out


def site_config(gateway_port: int, listen_port: int, tls: tuple[Path, Path] | None = None,
                redirect_port: int | None = None) -> str:
    """config/nginx.conf with only the upstream address and the listen port changed (or TLS switched on)."""
    text = SHIPPED.read_text()
    text = _replace_once(text, r"^    server 127\.0\.0\.1:8000;", f"    server 127.0.0.1:{gateway_port};")
    if tls is None:
        return _replace_once(text, r"^    listen 80;", f"    listen 127.0.0.1:{listen_port};")
    # What the file's comments tell an operator: delete `listen 80;`, uncomment the TLS lines with real paths,
    # uncomment the redirect server.
    cert, key = tls
    text = _replace_once(text, r"^    listen 80;\n", "")
    text, n = TLS_LINES.subn(r"    \1", text)
    assert n == 5, n
    text = _replace_once(text, r"^    listen 443 ssl http2;", f"    listen 127.0.0.1:{listen_port} ssl http2;")
    text = _replace_once(text, r"^    ssl_certificate     \S+;", f"    ssl_certificate     {cert};")
    text = _replace_once(text, r"^    ssl_certificate_key \S+;", f"    ssl_certificate_key {key};")
    head, sep, redirect = text.partition("# TLS: uncomment this server too; it sends plain-HTTP callers to HTTPS.")
    assert sep, "the commented redirect server is gone"
    redirect = re.sub(r"^# ", "", redirect, flags=re.M)
    redirect = _replace_once(redirect, r"^    listen 80;", f"    listen 127.0.0.1:{redirect_port};")
    return head + sep + "\n" + redirect


class Nginx:
    """A private nginx (the installed binary) running the given site, in the foreground."""

    def __init__(self, tmp: Path, site: str, port: int) -> None:
        self.tmp, self.port = tmp, port
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "boundless.conf").write_text(site)
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(f"""{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    gzip on;
    gzip_types *;
    gzip_min_length 1;
    gzip_proxied any;
    include {tmp}/boundless.conf;
}}
""")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run([NGINX, "-t", "-c", str(self.conf), "-p", f"{self.tmp}/", "-e",
                               str(self.tmp / "error.log")], capture_output=True, text=True, timeout=30)

    def start(self) -> "Nginx":
        res = self.check()
        assert res.returncode == 0, f"nginx -t refused the config:\n{res.stderr}"
        self.proc = subprocess.Popen([NGINX, "-c", str(self.conf), "-p", f"{self.tmp}/", "-e",
                                      str(self.tmp / "error.log"), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)          # graceful: finish open requests
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return (self.tmp / "error.log").read_text(errors="replace")


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(tmp_path_factory, mock):
    """A 2-worker gateway (SQLite) whose gunicorn access log shows what nginx forwarded."""
    tmp = tmp_path_factory.mktemp("gw-nginx")
    gateway = Gateway(tmp, mock.url, env={"BOUNDLESS_ACCESS_LOG": str(tmp / "access.log"),
                                          "GUNICORN_CMD_ARGS": f"--access-logformat '{ACCESS_FORMAT}'"})
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def nginx(gw, tmp_path_factory):
    port = free_port()
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), site_config(gw.port, port), port).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def key(gw):
    return gw.create_key(rpm=1000, rpd=1000)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


def open_stream(base: str, key: str, mock=None, marker: str = "") -> requests.Response:
    body = {"model": "free-model", "messages": [{"role": "user", "content": f"hello {marker}"}], "stream": True}
    if mock:
        body["mock"] = mock
    return session().post(base + "/api/v1/chat/completions", json=body, stream=True, timeout=30,
                          headers=auth(key))


def is_content(event: str) -> bool:
    return '"content":"' in event and '"content":""' not in event


def access_lines(gw: Gateway, path: str, want=lambda fields: True, timeout: float = 5.0) -> list[list[str]]:
    """The gateway's access-log lines for ``path`` (split into the ACCESS_FORMAT fields) that ``want`` accepts,
    waiting for one: gunicorn writes the line just after the response has gone."""
    log = gw.tmp / "access.log"
    deadline = time.monotonic() + timeout
    while True:
        lines = [line.split("|") for line in (log.read_text().splitlines() if log.exists() else [])]
        found = [f for f in lines if len(f) == 6 and f[5] == path and want(f)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def app_access_line(gw: Gateway, request_id: str, timeout: float = 5.0) -> dict | None:
    """The gateway's own JSON access line (logger boundless.access, on stderr) for one request."""
    deadline = time.monotonic() + timeout
    while True:
        for text in gw.log().splitlines():
            if request_id in text and text.startswith("{"):
                try:
                    obj = json.loads(text)
                except ValueError:
                    continue
                if obj.get("logger") == "boundless.access" and obj.get("request_id") == request_id:
                    return obj
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def get_from(source_ip: str, port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """GET through nginx from a chosen loopback source address (127.0.0.2 is another 'client' on Linux)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source_ip, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_openai_error(status: int, headers: dict, body: bytes, want_status: int, code: str) -> dict:
    assert status == want_status, body
    assert headers["content-type"].startswith("application/json"), headers
    obj = json.loads(body)
    assert set(obj) == {"error"} and set(obj["error"]) == {"message", "type", "param", "code"}, obj
    assert obj["error"]["code"] == code, obj
    return obj["error"]


# --------------------------------------------------------------------------------------------------
# the shipped file
# --------------------------------------------------------------------------------------------------

def test_shipped_file_is_what_the_tests_run():
    text = SHIPPED.read_text()
    active = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for directive in ("upstream boundless", "server 127.0.0.1:8000;", "keepalive 32;", "proxy_buffering off;",
                      "proxy_cache off;", "gzip off;", "proxy_read_timeout 600s;", "proxy_send_timeout",
                      "client_max_body_size 10m;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                      "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                      "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header X-Real-IP $remote_addr;",
                      "proxy_pass http://boundless;", "proxy_request_buffering on;", "client_body_timeout",
                      "error_page 400 494 /_boundless/bad_request;",
                      "error_page 414 /_boundless/uri_too_long;"):
        assert directive in active, directive
    assert "10m" in text and MAX_BODY == 10 * 1024 * 1024       # nginx's m is MiB, as the gateway's default
    # The generated site differs from the shipped one in exactly two lines.
    generated = site_config(18000, 18080).splitlines()
    shipped = text.splitlines()
    assert len(generated) == len(shipped)
    assert [(a, b) for a, b in zip(shipped, generated) if a != b] == [
        ("    server 127.0.0.1:8000;", "    server 127.0.0.1:18000;"),
        ("    listen 80;", "    listen 127.0.0.1:18080;")]


# --------------------------------------------------------------------------------------------------
# streams, JSON, hang-ups
# --------------------------------------------------------------------------------------------------

def test_stream_arrives_event_by_event_through_nginx(nginx, key):
    start = time.monotonic()
    with open_stream(nginx.url, key, mock={"chunks": 5, "gap": 0.3}) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Encoding" not in resp.headers        # gzip on in http {}, off for the API
        got = events_with_times(resp)
    content = [(t, e) for t, e in got if is_content(e)]
    assert len(content) == 5, got
    gaps = [b[0] - a[0] for a, b in zip(content, content[1:])]
    # Buffered by nginx, they would arrive together at the end; each must come about 0.3 s after the last.
    assert min(gaps) > 0.15, gaps
    assert content[0][0] - start < 1.0
    assert got[-1][1] == "data: [DONE]"


def test_json_chat_and_stream_through_nginx_with_the_sdk(nginx, key):
    client = openai.OpenAI(api_key=key, base_url=nginx.url + "/api/v1", max_retries=0)
    out = client.chat.completions.create(model="free-model", messages=MSG)
    assert out.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert out.usage.completion_tokens == 5
    raw = client.chat.completions.with_raw_response.create(model="free-model", messages=MSG)
    assert raw.headers["x-request-id"].startswith("req_")    # the gateway's headers pass through
    assert raw.headers["x-ratelimit-remaining-requests"]
    assert "content-encoding" not in raw.headers
    stream = client.chat.completions.create(model="free-model", messages=MSG, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "tok0 tok1 tok2 tok3 tok4"
    with pytest.raises(openai.AuthenticationError):          # the gateway's 401, untouched by nginx
        openai.OpenAI(api_key="sk-wrong", base_url=nginx.url + "/api/v1", max_retries=0).models.list()


def test_hang_up_through_nginx_closes_the_upstream(nginx, gw, key, mock):
    marker = uuid.uuid4().hex
    resp = open_stream(nginx.url, key, mock={"chunks": 200, "gap": 0.1}, marker=marker)
    assert resp.status_code == 200
    rid = resp.headers["X-Request-Id"]
    buf = b""
    while len(re.findall(rb'"content":" ?tok', buf)) < 2:
        data = resp.raw.read1(65536)
        assert data, "stream ended early"
        buf += data
    hung_up = time.monotonic()
    resp.close()                                      # the caller goes away; only nginx can tell the gateway
    rec = mock.wait_for(lambda r: marker in json.dumps(r["body"]) and r["client_closed"], timeout=10)
    assert rec is not None, "the upstream was never closed"
    assert time.monotonic() - hung_up < 5 and rec["chunks_sent"] < 100 and not rec["completed"]
    # The gateway itself saw a hang-up (not an upstream failure): its ledger row says so.
    db.initialize(make_database(gw.database_url))
    try:
        deadline = time.monotonic() + 10
        while (row := Usage.get_or_none(Usage.request_id == rid)) is None or row.state != "settled":
            assert time.monotonic() < deadline, "the request was never settled"
            time.sleep(0.1)
        assert row.outcome == "client_closed", row.outcome
    finally:
        db.close_all()


# --------------------------------------------------------------------------------------------------
# headers, restricted endpoints, body size, nginx's own errors
# --------------------------------------------------------------------------------------------------

def test_forwarded_headers_reach_the_gateway(nginx, gw, key):
    # From 127.0.0.2 (another client address on the loopback), with a spoofed X-Forwarded-For: nginx appends
    # the address it saw, and sets X-Real-IP to it alone.
    status, headers, _ = get_from("127.0.0.2", nginx.port, "/api/v1/key",
                                  {**auth(key), "X-Forwarded-For": "203.0.113.9"})
    assert status == 200
    [fields] = access_lines(gw, "/api/v1/key", lambda f: "127.0.0.2" in f[1])
    peer, xff, real_ip, proto, scheme, _ = fields
    assert xff == "203.0.113.9, 127.0.0.2" and real_ip == "127.0.0.2", fields
    assert proto == "http" and scheme == "http", fields
    # gunicorn's peer is nginx (127.0.0.1, trusted); the gateway takes the caller's address from the last
    # X-Forwarded-For hop, the one nginx appended (the spoofed first hop is ignored), and so does the log.
    assert peer == "127.0.0.2"

    # The gateway's own access line (app/server/logs.py) names the caller's address.
    rid = headers["x-request-id"]
    line = app_access_line(gw, rid)
    assert line is not None, f"no boundless.access line for {rid}"
    assert line["remote_addr"] == "127.0.0.2", line


def test_operations_endpoints_only_from_the_allow_list(nginx):
    for path in ("/metrics", "/healthz", "/readyz"):
        status, headers, body = get_from("127.0.0.2", nginx.port, path)
        assert_openai_error(status, headers, body, 403, "forbidden")
    # From the box itself they reach the gateway.
    status, _, body = get_from("127.0.0.1", nginx.port, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}, body
    status, _, body = get_from("127.0.0.1", nginx.port, "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready", body
    status, headers, body = get_from("127.0.0.1", nginx.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), body[:200]
    # Nothing else is restricted.
    status, _, _ = get_from("127.0.0.2", nginx.port, "/api/v1/models")
    assert status == 401


def test_body_limit_matches_the_gateway(nginx, key):
    http = session()
    headers = {**auth(key), "Content-Type": "application/json"}
    url = nginx.url + "/api/v1/chat/completions"
    # Exactly the gateway's limit passes nginx and reaches the gateway (which rejects it as bad JSON)...
    resp = http.post(url, data=b"x" * MAX_BODY, headers=headers, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", resp.text
    assert resp.headers.get("X-Request-Id")           # the gateway answered, not nginx
    # ... one byte more is refused by nginx, in OpenAI's shape.
    resp = http.post(url, data=b"x" * (MAX_BODY + 1), headers=headers, timeout=60)
    assert_openai_error(resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, resp.content, 413,
                        "request_too_large")
    assert "X-Request-Id" not in resp.headers


def raw_request(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send ``data`` as is on a new connection; return the response's status, headers and body (read to the end:
    nginx closes the connection after refusing a malformed request)."""
    buf = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                buf += chunk
        except ConnectionResetError:      # closed with part of the request unread: a reset, maybe before the answer
            if not buf:
                return 0, {}, b""
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


MALFORMED = {
    "content-length and transfer-encoding": (
        b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    "NUL in a header": (b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n", 400, "bad_request"),
    "oversized header": (b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
                         400, "bad_request"),
    "oversized request line": (b"GET /api/v1/models?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                               414, "uri_too_long"),
    "garbage request line": (b"\x01\x02 nonsense\r\n\r\n", 400, "bad_request"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_http_gets_json_from_nginx(nginx, gw, case):
    data, want_status, code = MALFORMED[case]
    status, headers, body = raw_request(nginx.port, data)
    assert_openai_error(status, headers, body, want_status, code)
    # Straight to gunicorn, the same request gets gunicorn's own page (what the README's error table says), or a
    # reset when gunicorn closes with the rest of an oversized request unread.
    status, headers, body = raw_request(gw.port, data)
    assert status == 0 or (400 <= status < 500 and headers.get("content-type") == "text/html"), (
        status, headers, body[:200])


def test_gateway_down_is_a_json_502(tmp_path, key):
    port = free_port()
    proxy = Nginx(tmp_path / "nginx", site_config(free_port(), port), port).start()   # nothing on that port
    try:
        client = openai.OpenAI(api_key=key, base_url=proxy.url + "/api/v1", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="free-model", messages=MSG)
        assert info.value.status_code == 502
        assert info.value.response.json()["error"]["code"] == "gateway_unavailable"
        assert "not available" in info.value.message
        assert info.value.response.headers["retry-after"] == "5"
    finally:
        proxy.stop()


# --------------------------------------------------------------------------------------------------
# TLS, switched on as the file's comments say
# --------------------------------------------------------------------------------------------------

def test_tls_block_as_documented(gw, key, tmp_path):
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl is not installed")
    cert, pkey = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(pkey), "-out", str(cert)], check=True, capture_output=True)
    port, plain = free_port(), free_port()
    proxy = Nginx(tmp_path / "nginx", site_config(gw.port, port, tls=(cert, pkey), redirect_port=plain),
                  port).start()
    try:
        wait_port(plain)
        client = openai.OpenAI(api_key=key, base_url=f"https://127.0.0.1:{port}/api/v1", max_retries=0,
                               http_client=httpx2.Client(verify=False))
        out = client.chat.completions.with_raw_response.create(model="free-model", messages=MSG,
                                                               extra_headers={"X-Trace": "tls"})
        assert out.parse().choices[0].message.content.startswith("tok0")
        # gunicorn trusts X-Forwarded-Proto from 127.0.0.1: the app sees https.
        assert access_lines(gw, "/api/v1/chat/completions", lambda f: f[3] == "https" and f[4] == "https")
        # Plain HTTP is redirected with 308 (a POST stays a POST).
        resp = session().post(f"http://127.0.0.1:{plain}/api/v1/chat/completions", json={}, timeout=10,
                              allow_redirects=False)
        assert resp.status_code == 308
        assert resp.headers["Location"] == "https://127.0.0.1/api/v1/chat/completions"
    finally:
        proxy.stop()


# --------------------------------------------------------------------------------------------------
# as deployed: `boundless serve` (what the systemd unit runs) behind the site
# --------------------------------------------------------------------------------------------------

def test_boundless_serve_behind_nginx_as_deployed(tmp_path, mock):
    """docs/deploying.md (b): BOUNDLESS_BIND + `boundless serve`, nginx in front; SIGTERM to the PID that was
    started (what systemd signals) stops gunicorn cleanly, because `boundless serve` execs it."""
    gateway_port, port = free_port(), free_port()
    setup = Gateway(tmp_path / "gw", mock.url)                  # only for its environment and CLI
    env = {**setup.env, "BOUNDLESS_BIND": f"127.0.0.1:{gateway_port}"}
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen([str(BIN / "boundless"), "serve"], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proxy = Nginx(tmp_path / "nginx", site_config(gateway_port, port), port)
    try:
        wait_port(gateway_port, timeout=30)
        cmdline = Path(f"/proc/{serve.pid}/cmdline").read_bytes().split(b"\0")
        assert b"gunicorn" in cmdline, cmdline                  # the same PID is now the gunicorn master
        proxy.start()
        key = setup.create_key(rpm=100, rpd=100)
        client = openai.OpenAI(api_key=key, base_url=proxy.url + "/api/v1", max_retries=0)
        assert client.chat.completions.create(model="free-model", messages=MSG).choices[0].message.content
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        proxy.stop()
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(5)
        log.close()
