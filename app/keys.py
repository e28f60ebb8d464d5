"""
app.keys
~~~~~~~~

Callers' API keys: minting, hashing, lookup and administration. No Flask here.

A key is ``sk-`` + 43 URL-safe characters (256 random bits). Only its SHA-256 hex digest and a display
prefix are stored; lookup is one indexed equality query on the digest, so timing reveals nothing useful.
Lookups are cached per process for ``ttl`` seconds, which bounds how long a revocation or a limit change takes
to reach every worker and every gateway sharing the database.
"""
from __future__ import annotations

import datetime
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

from peewee import IntegrityError

from .accounting import budget as budgets
from .accounting.credits import to_micro
from .accounting.ledger_sql import lock_key
from .policy import patterns
from .errors import ConfigurationError
from .store.models import ApiKey
from .store.models import CreditEntry
from .store.models import db
from .store.models import utcnow

PREFIX_LEN = 8


class KeyExists(ConfigurationError):
    """:func:`create`: a key of that name exists already."""


def mint() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def mask(key: str) -> str:
    """Show a presented key the way OpenAI does in errors: first and last characters only."""
    return f"{key[:5]}...{key[-4:]}" if len(key) > 12 else "***"


@dataclass(frozen=True)
class KeyInfo:
    """What a request needs of a key: a snapshot, safe to cache and share between threads."""

    id: int
    name: str
    prefix: str
    rpm: int | None         # as stored: None = the catalogue's default, UNLIMITED = no limit (see effective_limit)
    rpd: int | None
    disabled: bool = False  # authenticated, but refused with 401 key_disabled until `boundless keys enable`
    models: tuple[str, ...] | None = None        # allow-list patterns (app/policy.py); None = every model
    expires_at: datetime.datetime | None = None  # naive UTC; 401 key_expired from then on
    max_parallel: int | None = None              # requests in flight at once (app/limits/parallel.py)
    admin: bool = False     # may call the admin API and nothing else (`keys create --admin`)


#: Stored in ``api_key.rpm``/``rpd`` for "no limit of this kind" (the CLI's ``none``); NULL is the catalogue's
#: default. A limit of 0 requests would make a key that can never call: that is what ``disable`` is for.
UNLIMITED = 0


def effective_limit(stored: int | None, default: int) -> int | None:
    """The limit a key runs under: its own, else the catalogue's ``default``; None when it has no limit."""
    if stored is None:
        return default
    return None if stored == UNLIMITED else stored


class KeyCache:
    """A small TTL cache of digest -> KeyInfo (or None for unknown/revoked) per process."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: dict[str, tuple[float, KeyInfo | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, key: str) -> KeyInfo | None:
        h = digest(key)
        now = time.monotonic()
        hit = self._items.get(h)
        if hit is not None and hit[0] > now:
            return hit[1]
        row = (ApiKey.select(ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.rpm, ApiKey.rpd, ApiKey.disabled,
                             ApiKey.models, ApiKey.expires_at, ApiKey.max_parallel,
                             ApiKey.admin)
               .where((ApiKey.key_hash == h) & (ApiKey.revoked == False))   # noqa: E712 (SQL, not Python)
               .tuples()
               .first())
        info = KeyInfo(*row[:5], disabled=bool(row[5]), models=patterns(row[6]), expires_at=row[7],
                       max_parallel=row[8], admin=bool(row[9])) if row else None
        if self.ttl > 0:
            with self._lock:
                if len(self._items) > 10_000:
                    self._items.clear()
                self._items[h] = (now + self.ttl, info)
        return info


# --------------------------------------------------------------------------------------------------
# Administration (the CLI)
# --------------------------------------------------------------------------------------------------

def parse_limit(text: str, name: str, default: bool = False) -> int | None:
    """Read a ``--rpm``/``--rpd`` value: a positive whole number, or ``none`` for no limit of this kind
    (stored as :data:`UNLIMITED`); with ``default``, also ``default`` for the catalogue's (stored as None).

    :raise ConfigurationError: for 0 (a key that can never call: the message points to ``keys disable``) and
        anything that is not a positive number, ``none`` (or ``default``).
    """
    word = text.strip().lower()
    if word == "none":
        return UNLIMITED
    if default and word == "default":
        return None
    also = ", `none` (no limit)" + (" or `default` (the catalogue's)" if default else "")
    try:
        value = int(word)
    except ValueError:
        raise ConfigurationError(f"--{name} must be a positive number of requests{also}, not {text!r}") from None
    if value == 0:
        raise ConfigurationError(f"--{name} 0 would refuse every request of the key: to stop a key for a while use "
                                 f"`boundless keys disable NAME` (and `enable` to reopen it); for no limit give "
                                 f"--{name} none")
    if value < 0:
        raise ConfigurationError(f"--{name} must be a positive number of requests{also}, not {text!r}")
    return value


def _limit(value: int | None, name: str) -> int | None:
    """Check a stored limit: None (the catalogue's), UNLIMITED, or a positive number."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigurationError(f"--{name} must be a positive number of requests or none")
    return value


def create(name: str, rpm: int | None = None, rpd: int | None = None, credit: Decimal | str | None = None, *,
           models: str | None = None, expires_at: datetime.datetime | None = None, budget: int | None = None,
           budget_period: str | None = None, max_parallel: int | None = None, admin: bool = False) -> str:
    """Create a key and return it; the only time the full key exists outside the caller's hands.

    The policy (app/policy.py's parsers give these): ``models`` the stored allow-list (None: every model),
    ``expires_at`` naive UTC, ``budget`` micro-credits per ``budget_period``, ``max_parallel``.
    An ``admin`` key calls the admin API (app/api/admin.py) and nothing else.
    """
    if not name or len(name) > 100:
        raise ConfigurationError("a key name must be 1 to 100 characters")
    opening = to_micro(credit) if credit is not None else 0
    if opening < 0:
        raise ConfigurationError("--credit must not be negative")
    if (budget is None) != (budget_period is None):
        raise ConfigurationError("--budget and --budget-period go together (e.g. --budget 10 --budget-period month)")
    key = mint()
    try:
        with db.atomic():
            row = ApiKey.create(name=name, key_hash=digest(key), prefix=key[:PREFIX_LEN],
                                rpm=_limit(rpm, "rpm"), rpd=_limit(rpd, "rpd"), balance=opening, models=models,
                                expires_at=expires_at, budget=budget, budget_period=budget_period,
                                max_parallel=max_parallel, admin=bool(admin))
            CreditEntry.create(key=row, amount=opening, kind="open")
    except IntegrityError as err:
        raise KeyExists(f"a key named {name!r} already exists") from err
    return key


def get(name: str) -> ApiKey:
    row = ApiKey.get_or_none(ApiKey.name == name)
    if row is None:
        raise ConfigurationError(f"no key named {name!r}")
    return row


def revoke(name: str) -> None:
    """Revoke a key for good: it gets 401 ``invalid_api_key`` from its next request (the cache's TTL)."""
    row = get(name)
    ApiKey.update(revoked=True, revoked_at=utcnow()).where(ApiKey.id == row.id).execute()


def set_disabled(name: str, disabled: bool) -> bool:
    """Disable a key (401 ``key_disabled`` until enabled) or enable it again; return whether it changed.

    Unlike a revocation this is undone by ``enable``; a revoked key stays revoked.
    :raise ConfigurationError: no such key, or the key is revoked.
    """
    row = get(name)
    if row.revoked:
        raise ConfigurationError(f"the key {name!r} is revoked, and a revocation is final: create a new key")
    return bool(ApiKey.update(disabled=disabled)
                .where((ApiKey.id == row.id) & (ApiKey.disabled == (not disabled)))
                .execute())


_UNSET = object()


def update(name: str, rpm=_UNSET, rpd=_UNSET, credit: Decimal | str | None = None, *, models=_UNSET,
           expires_at=_UNSET, budget=_UNSET, budget_period=_UNSET, max_parallel=_UNSET,
           tz: datetime.tzinfo = datetime.timezone.utc) -> None:
    """Change a key's limits (None = back to the catalogue default, UNLIMITED = none), its policy (None = no
    restriction of that kind) and/or set its balance exactly.

    Setting a budget, or changing its period, counts the new period's spending so far from the ledger
    (:func:`app.accounting.budget.recount`, periods in ``tz``); changing only the amount keeps the count.
    """
    row = get(name)
    fields = {}
    if rpm is not _UNSET:
        fields[ApiKey.rpm] = _limit(rpm, "rpm")
    if rpd is not _UNSET:
        fields[ApiKey.rpd] = _limit(rpd, "rpd")
    for column, value in ((ApiKey.models, models), (ApiKey.expires_at, expires_at),
                          (ApiKey.max_parallel, max_parallel)):
        if value is not _UNSET:
            fields[column] = value
    with db.atomic():
        if budget is not _UNSET or budget_period is not _UNSET:
            fields.update(_budget_fields(row, budget, budget_period, tz))
        if fields:
            ApiKey.update(fields).where(ApiKey.id == row.id).execute()
        if credit is not None:
            target = to_micro(credit)
            if target < 0:
                raise ConfigurationError("--credit must not be negative")
            _set_balance(row.id, target)


def _budget_fields(row: ApiKey, amount, period, tz: datetime.tzinfo) -> dict:
    """The budget columns for a change of amount and/or period (in the caller's transaction)."""
    if amount is None:                                  # --budget none: no cap, nothing counted
        return {ApiKey.budget: None, ApiKey.budget_period: None, ApiKey.budget_spent: 0,
                ApiKey.budget_period_start: None}
    lock_key(db, db.execute_sql, row.id)                # reservations and settlements wait: the count stays exact
    current = ApiKey.get_by_id(row.id)
    kind = current.budget_period if period is _UNSET else period
    if kind is None:
        raise ConfigurationError(f"the key {row.name!r} has no budget: give --budget-period with --budget")
    if amount is _UNSET and current.budget is None:
        raise ConfigurationError(f"the key {row.name!r} has no budget: give --budget with --budget-period")
    fields = {ApiKey.budget_period: kind}
    if amount is not _UNSET:
        fields[ApiKey.budget] = amount
    if current.budget is None or kind != current.budget_period:    # a new count: what the period spent so far
        spent, start = budgets.recount(row.id, kind, datetime.datetime.now(datetime.timezone.utc), tz)
        fields.update({ApiKey.budget_spent: spent, ApiKey.budget_period_start: start})
    return fields


def _set_balance(key_id: int, target: int) -> None:
    # Read and write under the write lock of this transaction, and record the difference, so that
    # opening + entries - charges = balance holds whatever requests settle meanwhile.
    query = ApiKey.select(ApiKey.balance).where(ApiKey.id == key_id)
    if db.for_update:
        query = query.for_update()
    current = query.scalar()
    ApiKey.update(balance=target).where(ApiKey.id == key_id).execute()
    CreditEntry.create(key=key_id, amount=target - current, kind="set")


def topup(name: str, amount: Decimal | str) -> int:
    """Add ``amount`` credits; return the new balance in micro-credits."""
    micro = to_micro(amount)
    if micro <= 0:
        raise ConfigurationError("a top-up must be a positive amount (use `boundless keys update NAME --credit X` "
                                 "to set a balance)")
    row = get(name)
    with db.atomic():
        ApiKey.update(balance=ApiKey.balance + micro).where(ApiKey.id == row.id).execute()
        CreditEntry.create(key=row.id, amount=micro, kind="topup")
    return ApiKey.get_by_id(row.id).balance


def all_keys() -> list[ApiKey]:
    return list(ApiKey.select().order_by(ApiKey.id))


__all__ = ["KeyCache", "KeyInfo", "UNLIMITED", "all_keys", "create", "digest", "effective_limit", "get", "mask",
           "mint", "parse_limit", "revoke", "set_disabled", "topup", "update"]
