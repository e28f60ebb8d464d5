"""
app.upstream.probe
~~~~~~~~~~~~~~~~~~

``boundless providers check``: call each provider with each key of its pool and say whether it answers.

A provider is asked for its ``/models``; one that has none (404, 405) gets a one-token chat to a model it
serves instead. Only the key's variable name is ever shown, never the key; a provider's error text has the key
masked in case it echoes it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from dataclasses import replace

from ..catalog import Catalog
from ..catalog import Model
from ..catalog import Provider
from ..errors import GatewayError
from ..jsonio import dumps
from ..jsonio import loads
from .client import UpstreamClient


@dataclass
class Check:
    """The result of calling one provider with one key."""

    provider: str
    key_env: str | None
    ok: bool
    latency_ms: float | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "failing"

    def as_dict(self) -> dict:
        return {"provider": self.provider, "key_env": self.key_env, "status": self.status,
                "latency_ms": self.latency_ms, "error": self.error}


def targets(catalog: Catalog, model_id: str | None = None) -> list[tuple[Provider, str | None]]:
    """(provider, an upstream model it serves) to check: every provider, or those of one model's routes and
    its fallback models' routes."""
    if model_id is None:
        out: dict[str, tuple[Provider, str | None]] = {p.name: (p, None) for p in catalog.providers.values()}
        models = list(catalog.models.values())
    else:
        model = catalog.models[model_id]
        models = [model, *model.fallbacks]
        out = {}
    for model in models:
        for route in model.routes:
            name = route.provider.name
            if out.get(name, (None, None))[1] is None:
                out[name] = (route.provider, route.upstream_model)
    return list(out.values())


def check(client: UpstreamClient, provider: Provider, key_env: str | None, upstream_model: str | None) -> Check:
    """Call ``provider`` with the key in ``key_env`` (None: a provider that takes no key)."""
    if key_env is not None and not os.environ.get(key_env):
        return Check(provider.name, key_env, False, None, f"{key_env} is not set")
    keyed = replace(provider, api_key_env=key_env, api_key_envs=(key_env,) if key_env else ())
    t0 = time.perf_counter()
    try:
        resp = client.get(keyed, "/models")
        body = client.read_body(resp, provider.name)
        if resp.status_code in (404, 405) and upstream_model:
            model = Model(id=upstream_model, provider=keyed, upstream_model=upstream_model, owned_by="")
            payload = dumps({"model": upstream_model, "max_tokens": 1,
                             "messages": [{"role": "user", "content": "ping"}]})
            resp = client.open(model, payload, False)
            body = client.read_body(resp, provider.name)
    except GatewayError as err:
        return Check(provider.name, key_env, False, _ms(t0), err.message)
    if 200 <= resp.status_code < 300:
        return Check(provider.name, key_env, True, _ms(t0))
    return Check(provider.name, key_env, False, _ms(t0), _error(resp.status_code, body, keyed.api_key()))


def check_all(client: UpstreamClient, catalog: Catalog, model_id: str | None = None) -> list[Check]:
    return [check(client, provider, env, upstream)
            for provider, upstream in targets(catalog, model_id)
            for env in provider.api_key_envs or (None,)]


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


def _error(status: int, body: bytes, secret: str | None) -> str:
    """``HTTP <status>``, with the provider's error message when it sent an OpenAI-shaped one."""
    if secret:
        body = body.replace(secret.encode(), b"***")
    message = ""
    try:
        obj = loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            message = str(obj["error"].get("message") or "")
    except ValueError:
        pass
    message = " ".join(message.split())[:200]
    return f"HTTP {status}" + (f": {message}" if message else "")
