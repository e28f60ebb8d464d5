"""The TOML catalogue: the shipped file loads, and every mistake is refused with its line."""
from __future__ import annotations

import re
import textwrap
from decimal import Decimal

import pytest

from app import catalog
from app.errors import ConfigurationError
from app.settings import ROOT

GOOD = """\
[limits]
rpm = 7
rpd = 70
day_timezone = "Asia/Shanghai"

[providers.p]
base_url = "http://127.0.0.1:9/v1"
api_key_env = "P_KEY"

[models."m-free"]
provider = "p"

[models."m-paid"]
provider = "p"
upstream_model = "up-paid"
owned_by = "someone"
input_price = 0.28
output_price = 1.1
max_output_tokens = 64
"""


def load(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(text))
    return catalog.load(path)


def test_shipped_catalogue_loads():
    cat = catalog.load(ROOT / "config" / "boundless.toml")
    assert cat.limits.rpm == 20 and cat.limits.rpd == 50 and cat.limits.day_timezone == "UTC"
    assert {"deepseek-chat", "gpt-4o"} <= set(cat.models)
    assert cat.models["deepseek-chat"].provider.base_url == "https://api.deepseek.com/v1"
    assert cat.models["deepseek-chat"].provider.api_key_env == "DEEPSEEK_API_KEY"
    assert all(m.paid for m in cat.models.values())


def test_fields_and_defaults(tmp_path):
    cat = load(tmp_path, GOOD)
    assert (cat.limits.rpm, cat.limits.rpd, cat.limits.day_timezone) == (7, 70, "Asia/Shanghai")
    free, paid = cat.models["m-free"], cat.models["m-paid"]
    assert (free.upstream_model, free.owned_by, free.paid) == ("m-free", "p", False)
    assert free.max_output_tokens == catalog.DEFAULT_MAX_OUTPUT_TOKENS
    assert (paid.upstream_model, paid.owned_by, paid.paid) == ("up-paid", "someone", True)
    assert paid.input_price == Decimal("0.28") and paid.output_price == Decimal("1.1")   # exact, not floats
    assert paid.provider.chat_url == "http://127.0.0.1:9/v1/chat/completions"


def test_provider_key_read_from_environment(tmp_path, monkeypatch):
    cat = load(tmp_path, GOOD)
    monkeypatch.setenv("P_KEY", "secret-1")
    assert cat.models["m-free"].provider.api_key() == "secret-1"
    monkeypatch.delenv("P_KEY")
    assert cat.models["m-free"].provider.api_key() is None


@pytest.mark.parametrize(("old", "new", "line", "words"), [
    ('upstream_model = "up-paid"', 'upstream_modle = "up-paid"', 15, "unknown key 'upstream_modle'"),
    ('provider = "p"\n\n[models."m-paid"]', 'provider = "nope"\n\n[models."m-paid"]', 11, "provider 'nope'"),
    ("input_price = 0.28", "input_price = -0.28", 17, "must not be negative"),
    ("rpm = 7", "rpm = -1", 2, "rpm must be an integer"),
    ("rpd = 70", "rpd = 70\nburst = 3", 4, "unknown key 'burst'"),
    ('day_timezone = "Asia/Shanghai"', 'day_timezone = "Mars/Base"', 4, "not a known time zone"),
    ('base_url = "http://127.0.0.1:9/v1"', 'base_url = "ftp://x"', 7, "base_url"),
    ("max_output_tokens = 64", "max_output_tokens = 0", 19, "max_output_tokens"),
    ('output_price = 1.1', 'output_price = "cheap"', 18, "output_price"),
])
def test_mistakes_are_refused_with_their_line(tmp_path, old, new, line, words):
    assert old in GOOD
    with pytest.raises(ConfigurationError) as err:
        load(tmp_path, GOOD.replace(old, new, 1))
    assert f"c.toml:{line}:" in str(err.value)
    assert words in str(err.value)


def test_unknown_top_level_and_syntax_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown top-level key 'extra'"):
        load(tmp_path, GOOD + "\n[extra]\na = 1\n")
    with pytest.raises(ConfigurationError, match="c.toml"):
        load(tmp_path, GOOD + "\n[[broken\n")
    with pytest.raises(ConfigurationError, match="cannot read the catalogue"):
        catalog.load(tmp_path / "missing.toml")


# --------------------------------------------------------------------------------------------------
# ${NAME:-default} (issue 19.2)
# --------------------------------------------------------------------------------------------------

ENV_CATALOG = """\
[limits]
rpm = "${CAT_RPM:-7}"

[providers.p]
base_url = "${CAT_URL:-http://127.0.0.1:9100/v1}"
headers = { X-Team = "team-${CAT_TEAM:-none}", X-Literal = "$${NOT_A_VAR}" }

[models."m"]
provider = "p"
input_price = "${CAT_PRICE:-0.5}"
"""


def test_environment_values_and_defaults(tmp_path, monkeypatch):
    for name in ("CAT_RPM", "CAT_URL", "CAT_TEAM", "CAT_PRICE"):
        monkeypatch.delenv(name, raising=False)
    cat = load(tmp_path, ENV_CATALOG)
    assert cat.providers["p"].base_url == "http://127.0.0.1:9100/v1"
    assert cat.providers["p"].headers == {"X-Team": "team-none", "X-Literal": "${NOT_A_VAR}"}
    assert cat.limits.rpm == 7 and cat.models["m"].input_price == Decimal("0.5")

    monkeypatch.setenv("CAT_URL", "http://127.0.0.1:9200/v1")
    monkeypatch.setenv("CAT_RPM", "30")
    monkeypatch.setenv("CAT_TEAM", "blue")
    monkeypatch.setenv("CAT_PRICE", "1.25")
    cat = load(tmp_path, ENV_CATALOG)
    assert cat.providers["p"].base_url == "http://127.0.0.1:9200/v1"
    assert cat.providers["p"].headers["X-Team"] == "team-blue"
    assert cat.limits.rpm == 30 and cat.models["m"].input_price == Decimal("1.25")


@pytest.mark.parametrize("value, env, message", [
    ('base_url = "${CAT_UNSET}"', {}, r"c\.toml:7: the environment variable CAT_UNSET is not set"),
    ('base_url = "${CAT_URL-x}"', {}, r"c\.toml:7: .* is not \$\{NAME\} or \$\{NAME:-default\}"),
    ('base_url = "http://${CAT_HOST}:9/v1"', {}, r"c\.toml:7: the environment variable CAT_HOST is not set"),
])
def test_environment_mistakes_name_the_variable_and_line(tmp_path, monkeypatch, value, env, message):
    monkeypatch.delenv("CAT_UNSET", raising=False)
    monkeypatch.delenv("CAT_URL", raising=False)
    monkeypatch.delenv("CAT_HOST", raising=False)
    for name, v in env.items():
        monkeypatch.setenv(name, v)
    text = GOOD.replace('base_url = "http://127.0.0.1:9/v1"', value)
    with pytest.raises(ConfigurationError, match=message):
        load(tmp_path, text)


def test_a_number_from_the_environment_must_be_a_number(tmp_path, monkeypatch):
    monkeypatch.setenv("CAT_RPM", "lots")
    with pytest.raises(ConfigurationError, match=r"c\.toml:2: rpm must be an integer >= 0, not 'lots'"):
        load(tmp_path, ENV_CATALOG)


def test_offline_catalogue_follows_mock_upstream_url(monkeypatch):
    monkeypatch.delenv("MOCK_UPSTREAM_URL", raising=False)
    assert catalog.load(ROOT / "config" / "offline.toml").providers["mock"].base_url == "http://127.0.0.1:9100/v1"
    monkeypatch.setenv("MOCK_UPSTREAM_URL", "http://127.0.0.1:9300/v1")
    assert catalog.load(ROOT / "config" / "offline.toml").providers["mock"].base_url == "http://127.0.0.1:9300/v1"


def test_a_providers_proxy_and_ca_bundle(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cat = load(tmp_path, GOOD.replace('api_key_env = "P_KEY"', f'api_key_env = "P_KEY"\nproxy = "http://127.0.0.1:3128"'
                                      f'\nca_bundle = "{ca}"'))
    provider = cat.models["m-free"].provider
    assert (provider.proxy, provider.ca_bundle) == ("http://127.0.0.1:3128", str(ca))
    assert load(tmp_path, GOOD.replace('api_key_env = "P_KEY"', 'proxy = ""')).providers["p"].proxy == ""
    default = load(tmp_path, GOOD).providers["p"]
    assert (default.proxy, default.ca_bundle) == (None, None)      # the environment decides


@pytest.mark.parametrize(("value", "words"), [
    ('proxy = "127.0.0.1:3128"', "proxy must be an http:// or https:// URL"),
    ('proxy = "http://host:1/path"', "proxy must be an http:// or https:// URL"),
    ("proxy = 3128", "proxy must be"),
    ('ca_bundle = "/no/such/ca.pem"', "is not a file"),
    ('ca_bundle = ""', "ca_bundle must be a non-empty string"),
])
def test_a_bad_proxy_or_ca_bundle_is_refused_with_its_line(tmp_path, value, words):
    with pytest.raises(ConfigurationError) as err:
        load(tmp_path, GOOD.replace('api_key_env = "P_KEY"', f'api_key_env = "P_KEY"\n{value}'))
    assert "c.toml:9:" in str(err.value) and words in str(err.value)


def test_kind_responses_and_api(tmp_path):
    cat = load(tmp_path, GOOD + """
[providers.oa]
base_url = "https://api.openai.com/v1"
responses = true

[providers.an]
base_url = "https://api.anthropic.com"
api = "anthropic"

[models.emb]
provider = "oa"
kind = "embedding"

[models.claude]
provider = "an"
""")
    assert (cat.models["m-free"].kind, cat.models["emb"].kind) == ("chat", "embedding")
    p, oa, an = cat.providers["p"], cat.providers["oa"], cat.providers["an"]
    assert (p.responses, p.api, oa.responses, oa.api, an.api) == (False, "openai", True, "openai", "anthropic")
    assert an.url("/v1/messages") == "https://api.anthropic.com/v1/messages"


@pytest.mark.parametrize("extra, line, words", [
    ('[models.bad]\nprovider = "p"\nkind = "image"\n', 'kind = "image"', "kind must be one of 'chat', 'embedding'"),
    ('[providers.bad]\nbase_url = "http://x"\napi = "gemini"\n', 'api = "gemini"', "api must be one of"),
    ('[providers.bad]\nbase_url = "http://x"\nresponses = "yes"\n', 'responses = "yes"', "responses must be true"),
    ('[providers.bad]\nbase_url = "http://x"\napi = "anthropic"\nresponses = true\n', "responses = true",
     'needs api = "openai"'),
])
def test_bad_kind_responses_or_api_is_refused_with_its_line(tmp_path, extra, line, words):
    text = GOOD + extra
    with pytest.raises(ConfigurationError) as err:
        load(tmp_path, text)
    n = text.splitlines().index(line) + 1
    assert f"c.toml:{n}:" in str(err.value) and words in str(err.value)


ROUTED = GOOD + """
[providers.q]
base_url = "http://127.0.0.1:9/v2"
api_key_env = ["Q_KEY_A", "Q_KEY_B"]

[models."routed"]
input_price = 1
routes = [
  { provider = "p", upstream_model = "p-up" },
  { provider = "q", upstream_model = "q-up", weight = 3 },
  { provider = "p", upstream_model = "p-other", weight = 1 },
  { provider = "q" },
]
fallback_models = ["m-paid", "m-free"]

[routing]
attempts = 5
cooldown_seconds = 12
"""


def test_routes_key_pools_fallbacks_and_routing(tmp_path):
    cat = load(tmp_path, ROUTED)
    routed = cat.models["routed"]
    assert [(r.provider.name, r.upstream_model, r.weight, r.group) for r in routed.routes] == [
        ("p", "p-up", None, 0), ("q", "q-up", 3, 1), ("p", "p-other", 1, 1), ("q", "routed", None, 2)]
    assert (routed.provider.name, routed.upstream_model) == ("p", "p-up")         # its first route's
    assert [m.id for m in routed.fallbacks] == ["m-paid", "m-free"]
    assert cat.providers["q"].api_key_envs == ("Q_KEY_A", "Q_KEY_B") and cat.providers["q"].api_key_env == "Q_KEY_A"
    assert cat.routing.attempts == 5 and cat.routing.cooldown_seconds == 12
    # today's catalogue: one route per model, the defaults for [routing]
    plain = load(tmp_path, GOOD)
    assert [(r.provider.name, r.upstream_model) for r in plain.models["m-paid"].routes] == [("p", "up-paid")]
    assert plain.providers["p"].api_key_envs == ("P_KEY",) and plain.models["m-paid"].fallbacks == ()
    assert plain.routing.attempts == 3 and plain.routing.cooldown_seconds == 30


@pytest.mark.parametrize("old, new, words", [
    ('{ provider = "q" },', '{ provider = "nope" },', "names provider 'nope'"),
    ('{ provider = "q" },', '{ provider = "q", price = 1 },', "unknown key 'price' in a route"),
    ('{ provider = "q" },', '{ provider = "p", upstream_model = "p-up" },', "route p/p-up twice"),
    ('weight = 3', 'weight = 0', "weight must be an integer >= 1"),
    ('"m-paid", "m-free"]', '"m-paid", "ghost"]', "fallback model 'ghost'"),
    ('"m-paid", "m-free"]', '"routed"]', "fallback model 'routed'"),
    ('["Q_KEY_A", "Q_KEY_B"]', '["Q_KEY_A", "Q_KEY_A"]', "api_key_env must be"),
    ('["Q_KEY_A", "Q_KEY_B"]', '[]', "api_key_env must be"),
    ("attempts = 5", "attempts = 0", "attempts must be an integer >= 1"),
    ("cooldown_seconds = 12", "cooldown = 12", "unknown key 'cooldown' in [routing]"),
    ('input_price = 1\nroutes', 'provider = "p"\nroutes', "either routes or provider"),
])
def test_routing_mistakes_are_refused(tmp_path, old, new, words):
    assert old in ROUTED
    with pytest.raises(ConfigurationError, match=r"c\.toml:\d+: .*" + re.escape(words)):
        load(tmp_path, ROUTED.replace(old, new, 1))
