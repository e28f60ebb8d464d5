"""
app.keyops
~~~~~~~~~~

Key administration for the admin API and the web console: the same operations as ``boundless keys ...``
(app/keys.py), with the input checked field by field, and each change written to the audit log in the
same transaction. No Flask here: errors are :class:`~app.errors.GatewayError` subclasses, which the API
renders as JSON and the console shows on the page.

The fields a caller may set are the table :data:`FIELDS`: name -> parser of the value (a JSON value, or a
form's text). A parser returns what ``app.keys.create``/``update`` take for that keyword. A new per-key
setting joins the admin API and the console by one row here once app/keys.py takes it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

from peewee import fn

from . import audit
from . import keys
from . import policy
from .accounting import budget as budgets
from .accounting.credits import amount
from .accounting.credits import to_micro
from .errors import ConfigurationError
from .errors import Conflict
from .errors import InvalidRequest
from .errors import NotFound
from .store.models import utcnow
from .store.models import ApiKey
from .store.models import db


def _limit(value, name: str, update: bool, tz=None):
    """rpm/rpd: a positive whole number, ``"none"`` (no limit), or on update ``"default"``/null (the
    catalogue's)."""
    if value is None:
        if update:
            return None
        raise InvalidRequest(f"'{name}' must be a positive number of requests or \"none\"", param=name)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidRequest(f"'{name}' must be a positive number of requests or \"none\"", param=name)
    try:
        return keys.parse_limit(str(value), name, default=update)
    except ConfigurationError as err:
        raise InvalidRequest(str(err).replace("--", ""), param=name) from None


def _credit(value, name: str, update: bool, tz=None) -> str:
    """credit: an amount of credits, at most 6 decimals, not negative (a string or a JSON number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(f"'{name}' must be an amount of credits, e.g. \"12.5\"", param=name)
    text = repr(value) if isinstance(value, float) else str(value).strip()
    try:
        micro = to_micro(text)
    except ConfigurationError as err:
        raise InvalidRequest(f"'{name}': {err}", param=name) from None
    if micro < 0:
        raise InvalidRequest(f"'{name}' must not be negative", param=name)
    return text


def _text(value, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidRequest(f"'{name}' must be a string", param=name)
    return str(value).strip()


def _policy_value(parse: Callable[[], object], name: str):
    """Run one of app/policy.py's (or budget's) parsers, turning its message into a 400 naming the field."""
    try:
        return parse()
    except ConfigurationError as err:
        raise InvalidRequest(f"'{name}': " + str(err).replace("--", ""), param=name) from None


def _models(value, name: str, update: bool, tz=None):
    """models: a comma-separated allow-list (``*`` wildcards) or a JSON array of patterns; ``"*"``: every model."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a comma-separated string or an array of model patterns", param=name)
    return _policy_value(lambda: policy.parse_models(value), name)


def _expires(value, name: str, update: bool, tz=None):
    """expires: an ISO date or datetime, a duration (``30d``, ``12h``), or on update ``never``/null."""
    if value is None and update:
        value = "never"
    text = _text(value, name)
    if not update and text.lower() == "never":
        raise InvalidRequest(f"'{name}': a new key without '{name}' never expires", param=name)
    return _policy_value(lambda: policy.parse_expiry(text, tz or datetime.timezone.utc,
                                                     datetime.datetime.now(datetime.timezone.utc)), name)


def _budget(value, name: str, update: bool, tz=None):
    """budget: credits per budget_period, or on update ``none``/null (no budget)."""
    if value is None and update:
        value = "none"
    text = repr(value) if isinstance(value, float) else _text(value, name)
    return _policy_value(lambda: budgets.parse_budget(text, allow_none=update), name)


def _budget_period(value, name: str, update: bool, tz=None) -> str:
    return _policy_value(lambda: budgets.parse_period(_text(value, name)), name)


def _max_parallel(value, name: str, update: bool, tz=None):
    """max_parallel: a positive number, or on update ``none``/null (no cap)."""
    if value is None and update:
        value = "none"
    return _policy_value(lambda: policy.parse_max_parallel(_text(value, name), allow_none=update), name)


def _disabled(value, name: str, update: bool, tz=None) -> bool:
    if not update or not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false (and only on update)", param=name)
    return value


Parser = Callable[..., object]

#: Every field of a key the admin API and the console accept: name -> parser(value, name, update, tz), where
#: ``tz`` is ``[limits] day_timezone`` (a bare expiry date is that day's midnight there).
FIELDS: dict[str, Parser] = {"rpm": _limit, "rpd": _limit, "credit": _credit, "models": _models,
                             "expires": _expires, "budget": _budget, "budget_period": _budget_period,
                             "max_parallel": _max_parallel}

#: A field whose app/keys.py keyword has another name.
KEYWORDS = {"expires": "expires_at"}

#: Fields only a change takes (not ``keys.update`` keywords: each has its own operation).
CHANGE_ONLY: dict[str, Parser] = {"disabled": _disabled}


def parse(body: dict, update: bool, tz: datetime.tzinfo | None = None) -> dict:
    """The fields of ``body`` (a JSON object or a form) that are set, parsed.

    :raise InvalidRequest: an unknown field or a bad value, naming it.
    """
    known = {**FIELDS, **(CHANGE_ONLY if update else {})}
    out = {}
    for name, value in body.items():
        if name == "name" and not update:
            continue
        parser = known.get(name)
        if parser is None:
            raise InvalidRequest(f"unknown field '{name}'; a key takes {', '.join(sorted(known))}", param=name)
        out[name] = parser(value, name, update, tz)
    if not update and ("budget" in out) != ("budget_period" in out):     # a new key's budget needs both
        missing = "budget_period" if "budget" in out else "budget"
        raise InvalidRequest("'budget' and 'budget_period' go together (e.g. budget 10, budget_period month)",
                             param=missing)
    return out


@dataclass(frozen=True)
class Defaults:
    """The catalogue's default limits, for showing a key's effective limits (None: unknown)."""

    rpm: int | None = None
    rpd: int | None = None

    @classmethod
    def of(cls, catalog) -> "Defaults":
        """The defaults of a loaded catalogue (``[limits]``)."""
        return cls(catalog.limits.rpm, catalog.limits.rpd)


def view(row: ApiKey, defaults: Defaults = Defaults()) -> dict:
    """A key as the admin API shows it: never the key, only its prefix. ``rpm``/``rpd`` are the limits it
    runs under (null: none), ``rpm_default``/``rpd_default`` whether they are the catalogue's."""
    out = {"name": row.name, "prefix": row.prefix + "...", "admin": bool(row.admin), "state": state_of(row),
           "rpm": _effective(row.rpm, defaults.rpm), "rpd": _effective(row.rpd, defaults.rpd),
           "rpm_default": row.rpm is None, "rpd_default": row.rpd is None,
           "balance": amount(row.balance), "spent": amount(row.spent),
           "created_at": policy.iso_utc(row.created_at), "revoked_at": policy.iso_utc(row.revoked_at)}
    out.update({"models": list(policy.patterns(row.models) or ["*"]), "expires_at": policy.iso_utc(row.expires_at),
                "budget": None if row.budget is None else amount(row.budget), "budget_period": row.budget_period,
                "max_parallel": row.max_parallel})
    return out


def state_of(row: ApiKey) -> str:
    if row.revoked:
        return "revoked"
    if row.disabled:
        return "disabled"
    return "expired" if policy.expired(row, utcnow()) else "active"


def _effective(stored: int | None, default: int | None) -> int | None:
    if stored is None:
        return default
    return keys.effective_limit(stored, 0)


def get(name: str) -> ApiKey:
    """:raise NotFound: no key has this name."""
    row = ApiKey.get_or_none(ApiKey.name == name)
    if row is None:
        raise NotFound(f"no key named {name!r}", param="name", code="key_not_found")
    return row


def page(limit: int, offset: int, search: str = "", state: str = "") -> tuple[list[ApiKey], int]:
    """Keys by name (a search matches anywhere in the name), and how many match in all."""
    query = ApiKey.select()
    if search:
        query = query.where(fn.LOWER(ApiKey.name).contains(search.lower()))
    if state == "revoked":
        query = query.where(ApiKey.revoked == True)                                   # noqa: E712
    elif state == "active":
        query = query.where((ApiKey.revoked == False) & (ApiKey.disabled == False))  # noqa: E712
    elif state == "disabled":
        query = query.where((ApiKey.revoked == False) & (ApiKey.disabled == True))   # noqa: E712
    return list(query.order_by(ApiKey.name).limit(limit).offset(offset)), query.count()


def create(actor: str, name, fields: dict) -> tuple[str, ApiKey]:
    """Create a key with the parsed ``fields``; return (the key, shown this once; its row).

    :raise InvalidRequest: a bad name. :raise Conflict: the name is taken.
    """
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise InvalidRequest("'name' is required: 1 to 100 characters", param="name")
    name = name.strip()
    if ApiKey.select().where(ApiKey.name == name).exists():
        raise Conflict(f"a key named {name!r} already exists", param="name", code="key_exists")
    with db.atomic():
        try:
            key = keys.create(name, **_keywords(fields))
        except keys.KeyExists as err:          # a race on the name
            raise Conflict(str(err), param="name", code="key_exists") from None
        except ConfigurationError as err:      # a value keys.py refuses
            raise InvalidRequest(str(err)) from None
        audit.record(actor, "key.create", name, _shown(fields))
    return key, keys.get(name)


def change(actor: str, name: str, fields: dict, tz: datetime.tzinfo | None = None) -> ApiKey:
    """Apply parsed ``fields`` (limits, credit, disabled) to a key, all or nothing.

    :raise NotFound: no such key. :raise Conflict: the key is revoked.
    """
    row = get(name)
    if row.revoked:
        raise Conflict(f"the key {name!r} is revoked, and a revocation is final", code="key_revoked")
    updates = {k: v for k, v in fields.items() if k in FIELDS}
    with db.atomic():
        if updates:
            try:
                keys.update(name, **_keywords(updates), tz=tz or datetime.timezone.utc)
            except ConfigurationError as err:
                raise InvalidRequest(str(err)) from None
        if "disabled" in fields:
            keys.set_disabled(name, fields["disabled"])
        audit.record(actor, "key.update", name, _shown(fields))
    return keys.get(name)


def topup(actor: str, name: str, value) -> ApiKey:
    """Add credit. :raise InvalidRequest: not a positive amount. :raise NotFound, Conflict: as above."""
    row = get(name)
    if row.revoked:
        raise Conflict(f"the key {name!r} is revoked, and a revocation is final", code="key_revoked")
    text = _credit(value, "amount", True)
    if to_micro(text) <= 0:
        raise InvalidRequest("'amount' must be a positive amount of credits", param="amount")
    with db.atomic():
        keys.topup(name, text)
        audit.record(actor, "key.topup", name, {"amount": text})
    return keys.get(name)


def revoke(actor: str, name: str) -> ApiKey:
    """Revoke a key for good (its ledger rows stay); revoking a revoked key changes nothing."""
    row = get(name)
    if not row.revoked:
        with db.atomic():
            keys.revoke(name)
            audit.record(actor, "key.revoke", name)
    return keys.get(name)


def _keywords(fields: dict) -> dict:
    return {KEYWORDS.get(k, k): v for k, v in fields.items()}


def _shown(fields: dict) -> dict:
    """The changed fields as the audit log keeps them (amounts as decimal strings, times in ISO 8601)."""
    return {k: (str(v) if isinstance(v, Decimal) else policy.iso_utc(v) if isinstance(v, datetime.datetime) else v)
            for k, v in fields.items()}


__all__ = ["CHANGE_ONLY", "Defaults", "FIELDS", "change", "create", "get", "page", "parse",
           "revoke", "state_of", "topup", "view"]
