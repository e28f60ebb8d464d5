"""
app.catalog
~~~~~~~~~~~

The catalogue: providers, models, prices and default limits, read once from a TOML file.

Every mistake in the file is refused at start-up with the line it is on, so a running gateway always has a
valid catalogue. Prices are :class:`~decimal.Decimal` credits per 1M tokens (TOML floats are parsed as
decimals, never as binary floats). This module does not import Flask.

Any string value may name environment variables, read once when the file is loaded: ``"${NAME}"`` is the
variable's value (unset: a start-up error naming it), ``"${NAME:-default}"`` its value or ``default`` when it
is unset or empty, and ``$${`` a literal ``${``. A number may be written the same way (``rpm = "${RPM:-20}"``):
a value that came from the environment is read as a number where the catalogue needs one.
"""
from __future__ import annotations

import os
import re
import tomllib
import zoneinfo
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

from .errors import ConfigurationError

#: Completion tokens assumed for a paid request that gives no ``max_tokens`` and whose model has no
#: ``max_output_tokens`` in the catalogue.
DEFAULT_MAX_OUTPUT_TOKENS = 8192

_LIMIT_KEYS = {"rpm", "rpd", "day_timezone"}
_PROVIDER_KEYS = {"base_url", "api_key_env", "headers", "proxy", "ca_bundle", "responses", "api"}
_MODEL_KEYS = {"provider", "upstream_model", "owned_by", "input_price", "output_price", "max_output_tokens", "kind",
               "routes", "fallback_models"}
_ROUTE_KEYS = {"provider", "upstream_model", "weight"}
_ROUTING_KEYS = {"attempts", "cooldown_seconds"}

#: The APIs a provider may speak (``api``): OpenAI's (``base_url`` ends in ``/v1``) or Anthropic's Messages
#: API (``base_url`` is the Anthropic root, ``/v1/messages`` is appended).
APIS = ("openai", "anthropic")

#: What a model serves (``kind``): chat (``/chat/completions``, ``/responses``, ``/messages``) or embeddings.
KINDS = ("chat", "embedding")
_TOP_KEYS = {"limits", "providers", "models", "routing"}


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    #: The first (or only) key variable of the provider's pool; None: the provider takes no key.
    api_key_env: str | None
    headers: dict[str, str] = field(default_factory=dict)
    #: None: the proxy variables of the environment decide; "": no proxy; else the proxy URL for this provider.
    proxy: str | None = None
    #: A CA bundle (PEM file) to verify this provider's certificate with, instead of the default one.
    ca_bundle: str | None = None
    #: The provider serves OpenAI's Responses API at ``base_url + "/responses"``.
    responses: bool = False
    #: The API it speaks, one of :data:`APIS`.
    api: str = "openai"
    #: Every key variable of the provider's pool, in the catalogue's order (``api_key_env`` is the first).
    api_key_envs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.api_key_envs and self.api_key_env:
            object.__setattr__(self, "api_key_envs", (self.api_key_env,))

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def url(self, path: str) -> str:
        """The URL of one of the provider's endpoints: ``path`` (``"/embeddings"``...) after ``base_url``."""
        return self.base_url.rstrip("/") + path

    def api_key(self) -> str | None:
        """Read the provider key from the environment at call time (never stored in the catalogue)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True)
class Route:
    """One way to serve a model: a provider and the model's name there.

    ``group`` is the route's position: consecutive routes that each have a ``weight`` share one position and
    split its traffic by weight; every other route has a position of its own.
    """

    provider: Provider
    upstream_model: str
    weight: int | None = None
    group: int = 0


@dataclass(frozen=True)
class Model:
    """A catalogue model. ``provider`` / ``upstream_model`` are its first route's (a model written with
    ``provider = ...`` has exactly that one route); ``fallbacks`` are the models of ``fallback_models``."""

    id: str
    provider: Provider
    upstream_model: str
    owned_by: str
    input_price: Decimal = Decimal(0)
    output_price: Decimal = Decimal(0)
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    #: What it serves, one of :data:`KINDS`.
    kind: str = "chat"
    routes: tuple[Route, ...] = ()
    fallbacks: tuple["Model", ...] = ()

    def __post_init__(self) -> None:
        if not self.routes:
            object.__setattr__(self, "routes", (Route(self.provider, self.upstream_model),))

    @property
    def paid(self) -> bool:
        return bool(self.input_price or self.output_price)


@dataclass(frozen=True)
class Limits:
    rpm: int = 20
    rpd: int = 50
    day_timezone: str = "UTC"


@dataclass(frozen=True)
class Routing:
    """``[routing]``: upstream calls per request at most (all routes and keys together), and how long a key
    or route that failed is skipped."""

    attempts: int = 3
    cooldown_seconds: int = 30


@dataclass(frozen=True)
class Catalog:
    limits: Limits
    providers: dict[str, Provider]
    models: dict[str, Model]
    path: str = ""
    routing: Routing = field(default_factory=Routing)

    def resolve(self, model_id: str) -> Model | None:
        return self.models.get(model_id)


class _Where:
    """Find the line of a table or key in the TOML text, for error messages (tomllib gives no positions)."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def _header_line(self, table: tuple[str, ...]) -> int | None:
        for i, line in enumerate(self.lines):
            m = re.match(r"\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
            if m and _split_dotted(m.group(1)) == list(table):
                return i
        return None

    def line(self, table: tuple[str, ...], key: str | None = None) -> int | None:
        start = self._header_line(table) if table else -1
        if start is None:
            return None
        if key is None:
            return start + 1
        for i in range(start + 1, len(self.lines)):
            line = self.lines[i].strip()
            if line.startswith("["):
                break
            m = re.match(r'("([^"]*)"|[A-Za-z0-9_-]+)\s*=', line)
            if m and (m.group(2) if m.group(2) is not None else m.group(1)) == key:
                return i + 1
        return start + 1

    def error(self, message: str, table: tuple[str, ...], key: str | None = None) -> ConfigurationError:
        n = self.line(table, key)
        where = f"{self.path}:{n}" if n else self.path
        return ConfigurationError(f"{where}: {message}")


def _split_dotted(s: str) -> list[str]:
    return [p.strip().strip('"').strip("'") for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', s)]


#: ``$${`` (a literal ``${``), or ``${NAME}`` / ``${NAME:-default}``; NAME as in a POSIX shell.
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: A ``${`` that the pattern above did not take: a mistake (``${1X}``, ``${NAME``, ``${NAME-x}``).
_BAD_VAR = re.compile(r"(?<!\$)\$\{")


class _FromEnv(str):
    """A string value that took (part of) its text from the environment: where the catalogue needs a number,
    such a string is parsed as one (TOML would otherwise make ``"${RPM:-20}"`` a string for good)."""


def interpolate(data: dict, where: "_Where", environ: dict | None = None) -> dict:
    """Return ``data`` with every ``${NAME}`` / ``${NAME:-default}`` in its string values replaced.

    :raise ConfigurationError: ``file:line`` and the variable's name, for a variable that is unset and has no
        default, or a ``${`` that is not a well-formed reference.
    """
    environ = os.environ if environ is None else environ

    def value(v, path: tuple[str, ...]):
        if isinstance(v, dict):
            return {k: value(item, path + (k,)) for k, item in v.items()}
        if isinstance(v, list):
            return [value(item, path) for item in v]
        if not isinstance(v, str) or "${" not in v:
            return v
        table, key = _location(path)
        if _BAD_VAR.search(_VAR.sub("", v)):
            raise where.error(f"{v!r} has a ${{ that is not ${{NAME}} or ${{NAME:-default}} "
                              f"(write $${{ for a literal ${{)", table, key)

        def sub(m: re.Match) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            got = environ.get(name)
            if got is None or (got == "" and default is not None):
                if default is None:
                    raise where.error(f"the environment variable {name} is not set (and {m.group(0)} gives no "
                                      f"default: write ${{{name}:-default}} for one)", table, key)
                return default
            return got

        out = _VAR.sub(sub, v)
        return _FromEnv(out) if _VAR.search(v.replace("$${", "")) else out

    return value(data, ())


def _location(path: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The (table, key) of a value's path, as _Where finds lines: ``[providers.p] base_url``, ``[limits] rpm``."""
    depth = 2 if path and path[0] in ("providers", "models") else 1
    table = tuple(path[:depth]) if len(path) > depth else tuple(path[:-1])
    return table, (path[len(table)] if len(path) > len(table) else None)


def load(path: str | os.PathLike) -> Catalog:
    """Read and validate the catalogue at ``path``, with its ``${NAME:-default}`` values filled in.

    :raise ConfigurationError: with ``file:line`` for any unknown key, bad value, dangling reference or unset
        environment variable.
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigurationError(f"cannot read the catalogue {path}: {err.strerror}") from err
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as err:
        raise ConfigurationError(f"{path}: {err}") from err
    where = _Where(path, text)
    return parse(interpolate(data, where), where)


def parse(data: dict, where: _Where) -> Catalog:
    for key in data:
        if key not in _TOP_KEYS:
            raise where.error(f"unknown top-level key {key!r} (expected one of: limits, providers, models, "
                              f"routing)", (), key)
    limits = _parse_limits(data.get("limits", {}), where)
    providers = {name: _parse_provider(name, spec, where) for name, spec in _table(data, "providers", where).items()}
    specs = _table(data, "models", where)
    models = {mid: _parse_model(mid, spec, providers, where) for mid, spec in specs.items()}
    models = _with_fallbacks(models, specs, where)
    return Catalog(limits=limits, providers=providers, models=models, path=where.path,
                   routing=_parse_routing(data.get("routing", {}), where))


def _table(data: dict, name: str, where: _Where) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise where.error(f"[{name}] must contain tables like [{name}.NAME]", (name,))
    return value


def _unknown(spec: dict, allowed: set[str], table: tuple[str, ...], where: _Where) -> None:
    for key in spec:
        if key not in allowed:
            raise where.error(f"unknown key {key!r} in [{'.'.join(table)}] (allowed: {', '.join(sorted(allowed))})",
                              table, key)


def _int(spec: dict, key: str, default: int, table: tuple[str, ...], where: _Where, minimum: int = 0) -> int:
    value = spec.get(key, default)
    if isinstance(value, _FromEnv) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise where.error(f"{key} must be an integer >= {minimum}, not {value!r}", table, key)
    return value


def _str(spec: dict, key: str, table: tuple[str, ...], where: _Where, default: str | None = None) -> str | None:
    value = spec.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise where.error(f"{key} must be a non-empty string, not {value!r}", table, key)
    return value


def _parse_limits(spec: dict, where: _Where) -> Limits:
    table = ("limits",)
    if not isinstance(spec, dict):
        raise where.error("[limits] must be a table", table)
    _unknown(spec, _LIMIT_KEYS, table, where)
    tz = _str(spec, "day_timezone", table, where, "UTC")
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
        raise where.error(f"day_timezone {tz!r} is not a known time zone", table, "day_timezone") from err
    return Limits(rpm=_int(spec, "rpm", 20, table, where), rpd=_int(spec, "rpd", 50, table, where), day_timezone=tz)


def _parse_provider(name: str, spec: dict, where: _Where) -> Provider:
    table = ("providers", name)
    _unknown(spec, _PROVIDER_KEYS, table, where)
    base_url = _str(spec, "base_url", table, where)
    if not base_url or not re.match(r"https?://", base_url):
        raise where.error("base_url must be an http:// or https:// URL", table, "base_url")
    headers = spec.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise where.error("headers must be a table of strings", table, "headers")
    proxy = spec.get("proxy")
    if proxy is not None and (not isinstance(proxy, str) or (proxy and not re.match(r"https?://[^/?#]+/?$", proxy))):
        raise where.error(f'proxy must be an http:// or https:// URL like "http://host:port", or "" for none, '
                          f'not {proxy!r}', table, "proxy")
    ca_bundle = _str(spec, "ca_bundle", table, where)
    if ca_bundle is not None and not os.path.isfile(ca_bundle):
        raise where.error(f"ca_bundle {ca_bundle!r} is not a file (a PEM bundle of CA certificates)", table,
                          "ca_bundle")
    responses = spec.get("responses", False)
    if not isinstance(responses, bool):
        raise where.error(f"responses must be true or false, not {responses!r}", table, "responses")
    api = _choice(spec, "api", APIS, table, where)
    if responses and api != "openai":
        raise where.error('responses = true needs api = "openai" (the Responses API is OpenAI\'s)', table,
                          "responses")
    pool = _key_pool(spec, table, where)
    return Provider(name=name, base_url=base_url, api_key_env=pool[0] if pool else None,
                    headers=dict(headers), proxy=proxy, ca_bundle=ca_bundle, responses=responses, api=api,
                    api_key_envs=pool)


def _choice(spec: dict, key: str, allowed: tuple[str, ...], table: tuple[str, ...], where: _Where) -> str:
    """A string key that takes one of ``allowed`` (the first is its default)."""
    value = spec.get(key, allowed[0])
    if value not in allowed:
        raise where.error(f"{key} must be one of {', '.join(repr(a) for a in allowed)}, not {value!r}", table, key)
    return value


def _key_pool(spec: dict, table: tuple[str, ...], where: _Where) -> tuple[str, ...]:
    """``api_key_env``: one variable name, or a list of them (a pool of keys, tried in turn)."""
    value = spec.get("api_key_env")
    if value is None:
        return ()
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names) \
            or len(set(names)) != len(names):
        raise where.error(f"api_key_env must be an environment variable name or a list of distinct ones, "
                          f"not {value!r}", table, "api_key_env")
    return tuple(names)


def _parse_routing(spec: dict, where: _Where) -> Routing:
    table = ("routing",)
    if not isinstance(spec, dict):
        raise where.error("[routing] must be a table", table)
    _unknown(spec, _ROUTING_KEYS, table, where)
    return Routing(attempts=_int(spec, "attempts", 3, table, where, minimum=1),
                   cooldown_seconds=_int(spec, "cooldown_seconds", 30, table, where))


def _price(spec: dict, key: str, table: tuple[str, ...], where: _Where) -> Decimal:
    value = spec.get(key, 0)
    if isinstance(value, _FromEnv):
        try:
            value = Decimal(value.strip())
        except ArithmeticError:
            pass                         # refused below, with the text as it came from the environment
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or not Decimal(value).is_finite():
        raise where.error(f"{key} must be a number of credits per 1M tokens, not {value!r}", table, key)
    value = Decimal(value)
    if value < 0:
        raise where.error(f"{key} must not be negative ({value})", table, key)
    return value


def _parse_model(mid: str, spec: dict, providers: dict[str, Provider], where: _Where) -> Model:
    table = ("models", mid)
    _unknown(spec, _MODEL_KEYS, table, where)
    if "routes" in spec:
        if "provider" in spec or "upstream_model" in spec:
            raise where.error("a model has either routes or provider/upstream_model, not both", table, "routes")
        routes = _parse_routes(mid, spec["routes"], providers, table, where)
    else:
        pname = _str(spec, "provider", table, where)
        if pname is None:
            raise where.error("provider (or routes) is required", table)
        if pname not in providers:
            raise where.error(f"model {mid!r} names provider {pname!r}, which is not defined in [providers]",
                              table, "provider")
        routes = (Route(providers[pname], _str(spec, "upstream_model", table, where, mid)),)
    return Model(
        id=mid,
        provider=routes[0].provider,
        upstream_model=routes[0].upstream_model,
        owned_by=_str(spec, "owned_by", table, where, routes[0].provider.name),
        input_price=_price(spec, "input_price", table, where),
        output_price=_price(spec, "output_price", table, where),
        max_output_tokens=_int(spec, "max_output_tokens", DEFAULT_MAX_OUTPUT_TOKENS, table, where, minimum=1),
        kind=_choice(spec, "kind", KINDS, table, where),
        routes=routes,
    )


def _parse_routes(mid: str, value, providers: dict[str, Provider], table: tuple[str, ...],
                  where: _Where) -> tuple[Route, ...]:
    """``routes = [{provider, upstream_model, weight}, ...]``: tried in order; consecutive weighted routes
    share one position."""
    if not isinstance(value, list) or not value or not all(isinstance(r, dict) for r in value):
        raise where.error("routes must be a non-empty list of tables like { provider = \"NAME\" }", table, "routes")
    routes: list[Route] = []
    group = -1
    for spec in value:
        for key in spec:
            if key not in _ROUTE_KEYS:
                raise where.error(f"unknown key {key!r} in a route of {mid!r} (allowed: "
                                  f"{', '.join(sorted(_ROUTE_KEYS))})", table, "routes")
        pname = _str(spec, "provider", table, where)
        if pname is None or pname not in providers:
            raise where.error(f"a route of model {mid!r} names provider {pname!r}, which is not defined in "
                              f"[providers]", table, "routes")
        weight = None
        if "weight" in spec:
            weight = _int(spec, "weight", 1, table, where, minimum=1)
        if weight is None or not routes or routes[-1].weight is None:
            group += 1
        upstream = _str(spec, "upstream_model", table, where, mid)
        if any(r.provider.name == pname and r.upstream_model == upstream for r in routes):
            raise where.error(f"model {mid!r} has the route {pname}/{upstream} twice", table, "routes")
        routes.append(Route(providers[pname], upstream, weight, group))
    return tuple(routes)


def _with_fallbacks(models: dict[str, Model], specs: dict, where: _Where) -> dict[str, Model]:
    """Attach each model's ``fallback_models`` (other catalogue models, in order; their own fallbacks are
    not followed)."""
    out = dict(models)
    for mid, spec in specs.items():
        if "fallback_models" not in spec:
            continue
        table = ("models", mid)
        names = spec["fallback_models"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise where.error("fallback_models must be a list of distinct model ids", table, "fallback_models")
        for name in names:
            if name == mid or name not in models:
                raise where.error(f"fallback model {name!r} of {mid!r} is not another model of the catalogue",
                                  table, "fallback_models")
        out[mid] = replace(models[mid], fallbacks=tuple(models[n] for n in names))
    return out
