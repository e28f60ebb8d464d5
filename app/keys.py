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

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

from peewee import IntegrityError

from .accounting.credits import to_micro
from .errors import ConfigurationError
from .store.models import ApiKey
from .store.models import CreditEntry
from .store.models import db
from .store.models import utcnow

PREFIX_LEN = 8


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
    rpm: int | None
    rpd: int | None


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
        row = (ApiKey.select(ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.rpm, ApiKey.rpd)
               .where((ApiKey.key_hash == h) & (ApiKey.revoked == False))   # noqa: E712 (SQL, not Python)
               .tuples()
               .first())
        info = KeyInfo(*row) if row else None
        if self.ttl > 0:
            with self._lock:
                if len(self._items) > 10_000:
                    self._items.clear()
                self._items[h] = (now + self.ttl, info)
        return info


# --------------------------------------------------------------------------------------------------
# Administration (the CLI)
# --------------------------------------------------------------------------------------------------

def _limit(value: int | None, name: str) -> int | None:
    if value is not None and value < 0:
        raise ConfigurationError(f"--{name} must be 0 or more")
    return value


def create(name: str, rpm: int | None = None, rpd: int | None = None, credit: Decimal | str | None = None) -> str:
    """Create a key and return it; the only time the full key exists outside the caller's hands."""
    if not name or len(name) > 100:
        raise ConfigurationError("a key name must be 1 to 100 characters")
    opening = to_micro(credit) if credit is not None else 0
    if opening < 0:
        raise ConfigurationError("--credit must not be negative")
    key = mint()
    try:
        with db.atomic():
            row = ApiKey.create(name=name, key_hash=digest(key), prefix=key[:PREFIX_LEN],
                                rpm=_limit(rpm, "rpm"), rpd=_limit(rpd, "rpd"), balance=opening)
            CreditEntry.create(key=row, amount=opening, kind="open")
    except IntegrityError as err:
        raise ConfigurationError(f"a key named {name!r} already exists") from err
    return key


def get(name: str) -> ApiKey:
    row = ApiKey.get_or_none(ApiKey.name == name)
    if row is None:
        raise ConfigurationError(f"no key named {name!r}")
    return row


def revoke(name: str) -> None:
    row = get(name)
    ApiKey.update(revoked=True, revoked_at=utcnow()).where(ApiKey.id == row.id).execute()


_UNSET = object()


def update(name: str, rpm=_UNSET, rpd=_UNSET, credit: Decimal | str | None = None) -> None:
    """Change a key's limits (None = back to the catalogue default) and/or set its balance exactly."""
    row = get(name)
    fields = {}
    if rpm is not _UNSET:
        fields[ApiKey.rpm] = _limit(rpm, "rpm")
    if rpd is not _UNSET:
        fields[ApiKey.rpd] = _limit(rpd, "rpd")
    with db.atomic():
        if fields:
            ApiKey.update(fields).where(ApiKey.id == row.id).execute()
        if credit is not None:
            target = to_micro(credit)
            if target < 0:
                raise ConfigurationError("--credit must not be negative")
            _set_balance(row.id, target)


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


__all__ = ["KeyCache", "KeyInfo", "all_keys", "create", "digest", "get", "mask", "mint", "revoke",
           "topup", "update"]
