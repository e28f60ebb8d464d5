"""Providers behind TLS with a private CA, and behind proxies, through the gateway under gunicorn with the OpenAI SDK.

The CA and certificates are made in-process by ``trustme``; the proxy is a small threaded CONNECT / forwarding
proxy of this module's own on 127.0.0.1, which records each tunnel it opened."""
from __future__ import annotations

import socket
import ssl
import threading

import openai
import pytest
import trustme

from scripted import COMPLETION
from scripted import Script
from scripted import json_answer
from support import Gateway
from support import free_port

MSG = [{"role": "user", "content": "hi"}]
#: No proxy variable of the machine running the tests may leak into a gateway of these tests.
NO_ENV_PROXY = {name: "" for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                      "all_proxy", "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                                      "SSL_CERT_FILE")}



def _env(**settings: str) -> dict:
    """NO_ENV_PROXY with ``settings`` set (in the case given: a lower-case variable, even empty, wins over its
    upper-case one for requests, as for curl)."""
    env = {k: v for k, v in NO_ENV_PROXY.items() if k.upper() not in {name.upper() for name in settings}}
    return {**env, **settings}


class ConnectProxy:
    """An HTTP proxy: ``CONNECT host:port`` tunnels (HTTPS) and absolute-form requests (plain HTTP), each
    recorded in :attr:`seen` as ``"CONNECT host:port"`` or ``"POST http://..."``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = client.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n")[0].decode().split(" ", 2)
            self.seen.append(f"{method} {target}")
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
            else:                                   # absolute-form: http://host:port/path
                hostport, _, path = target.split("://", 1)[1].partition("/")
                host, port = hostport.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                lines = head.split(b"\r\n")
                lines[0] = f"{method} /{path} HTTP/1.1".encode()
                upstream.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
            self._pipe(client, upstream)
        except OSError:
            pass

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_pem(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _tls_server(ca: trustme.CA, *names: str) -> Script:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(ctx)
    return Script(lambda request: [json_answer(COMPLETION)], tls=ctx)


@pytest.fixture(scope="module")
def provider(ca):
    """An HTTPS provider on 127.0.0.1 whose certificate (for 127.0.0.1 and localhost) comes from the private CA."""
    with _tls_server(ca, "127.0.0.1", "localhost") as server:
        yield server


def _extra(name: str, url: str, **fields: str) -> str:
    lines = [f'\n[providers.{name}]', f'base_url = "{url}"']
    lines += [f'{k} = "{v}"' for k, v in fields.items()]
    lines += [f'\n[models."{name}-model"]', f'provider = "{name}"']
    return "\n".join(lines) + "\n"


def _chat(gw: Gateway, key: str, model: str):
    return gw.client(key).chat.completions.create(model=model, messages=MSG)


def test_a_private_ca_is_refused_by_default_and_accepted_with_requests_ca_bundle_or_ca_bundle(
        gateway_factory, provider, ca, ca_pem):
    with _tls_server(ca, "other.example") as wrong_host:
        gw = gateway_factory(upstream_url=provider.url, env=NO_ENV_PROXY,
                             catalog_extra=_extra("private", provider.url, ca_bundle=ca_pem)
                             + _extra("wronghost", wrong_host.url, ca_bundle=ca_pem))
        key = gw.create_key()
        before = provider.connections
        with pytest.raises(openai.InternalServerError) as info:       # the default CAs do not know ours
            _chat(gw, key, "free-model")
        assert info.value.status_code == 502
        message = info.value.body["message"]
        assert "certificate" in message and "127.0.0.1" not in message and str(provider.port) not in message
        assert provider.connections == before + 1                       # a certificate failure is not retried
        assert "failed: certificate (" in gw.log() and "certificate verify failed" in gw.log()

        assert _chat(gw, key, "private-model").choices[0].message.content == "hi"     # ca_bundle = our CA

        with pytest.raises(openai.InternalServerError) as info:       # our CA, but a certificate for another name
            _chat(gw, key, "wronghost-model")
        assert "certificate" in info.value.body["message"]
        assert "other.example" not in info.value.body["message"]
        assert "127.0.0.1" in gw.log().split("wronghost failed: certificate", 1)[1].split("\n", 1)[0]

    gw = gateway_factory(upstream_url=provider.url, env=_env(REQUESTS_CA_BUNDLE=ca_pem))
    assert _chat(gw, gw.create_key(), "free-model").choices[0].message.content == "hi"


def test_calls_go_through_https_proxy_or_the_providers_own_proxy_and_around_them_for_no_proxy(
        gateway_factory, provider, ca_pem, mock):
    env_proxy, own_proxy = ConnectProxy(), ConnectProxy()
    try:
        tls_at = f"127.0.0.1:{provider.port}"
        gw = gateway_factory(
            upstream_url=provider.url,
            env=_env(HTTPS_PROXY=env_proxy.url, http_proxy=env_proxy.url, NO_PROXY="localhost",
                     REQUESTS_CA_BUNDLE=ca_pem),
            catalog_extra=_extra("own", provider.url, proxy=own_proxy.url)
            + _extra("near", f"https://localhost:{provider.port}/v1")
            + _extra("direct", provider.url, proxy="")
            + _extra("plain", mock.url))
        key = gw.create_key()
        client = gw.client(key)

        assert _chat(gw, key, "free-model").choices[0].message.content == "hi"      # HTTPS_PROXY
        assert env_proxy.seen == [f"CONNECT {tls_at}"] and own_proxy.seen == []

        assert _chat(gw, key, "own-model").choices[0].message.content == "hi"       # proxy = "http://..."
        assert own_proxy.seen == [f"CONNECT {tls_at}"] and len(env_proxy.seen) == 1

        before = provider.connections
        assert _chat(gw, key, "near-model").choices[0].message.content == "hi"      # NO_PROXY=localhost
        assert _chat(gw, key, "direct-model").choices[0].message.content == "hi"    # proxy = ""
        assert len(env_proxy.seen) == 1 and len(own_proxy.seen) == 1
        assert provider.connections == before + 2

        out = client.chat.completions.create(model="plain-model", messages=MSG)     # http_proxy, plain HTTP
        assert out.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
        assert env_proxy.seen[1:] == [f"POST {mock.url}/chat/completions"]
    finally:
        env_proxy.close()
        own_proxy.close()


def test_a_proxy_that_cannot_be_reached_is_a_502_that_says_so(gateway_factory, provider, ca_pem):
    gw = gateway_factory(upstream_url=provider.url, env=NO_ENV_PROXY,
                         catalog_extra=_extra("gone", provider.url, proxy=f"http://127.0.0.1:{free_port()}",
                                              ca_bundle=ca_pem))
    with pytest.raises(openai.InternalServerError) as info:
        _chat(gw, gw.create_key(), "gone-model")
    assert info.value.status_code == 502 and "proxy" in info.value.body["message"]
    assert "127.0.0.1" not in info.value.body["message"]
    assert "gone failed: proxy (" in gw.log()
