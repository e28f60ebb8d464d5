"""
app.policy
~~~~~~~~~~

The per-key rules that are not money: which catalogue models a key may call, and until when it may call at all.
(The spending budget is money and lives with the reservation, app/accounting/budget.py; the parallel-request
cap is a counter on the rate-limit storage, app/limits/parallel.py.) No Flask here.

* **Models**: an allow-list of catalogue ids with shell-style wildcards (``deepseek-*``, ``gpt-4o-mini``), matched
  case-sensitively as the catalogue's ids are; no list (stored NULL) means every model. A model outside the list
  is refused with 403 ``model_not_allowed`` by :func:`check_model`, called by every view once the model is
  resolved, and left out of ``/models`` by :func:`allows`.
* **Expiry**: an instant (UTC in the database); from then on the key gets 401 ``key_expired`` (app/auth.py).
"""
from __future__ import annotations

import datetime
import re
from fnmatch import fnmatchcase
from typing import Protocol

from .errors import ConfigurationError
from .errors import ModelNotAllowed

#: The longest stored allow-list (the ``api_key.models`` column).
MAX_MODELS_LEN = 1000

_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class PolicyKey(Protocol):
    """What the rules need of a key (app.keys.KeyInfo has it)."""

    models: tuple[str, ...] | None
    expires_at: datetime.datetime | None


def allows(key: PolicyKey, model_id: str) -> bool:
    """Whether ``key`` may call the catalogue model ``model_id``."""
    return key.models is None or any(fnmatchcase(model_id, pattern) for pattern in key.models)


def check_model(key: PolicyKey, model) -> None:
    """Refuse a resolved catalogue ``model`` that the key may not call.

    :raise ModelNotAllowed: 403 ``model_not_allowed``, naming the model and what the key may call.
    """
    if not allows(key, model.id):
        raise ModelNotAllowed(f"This API key is not allowed to use the model '{model.id}'. It may use: "
                              f"{', '.join(key.models)}.", param="model")


def expired(key: PolicyKey, now: datetime.datetime) -> bool:
    """Whether the key has expired at ``now`` (naive UTC, as stored)."""
    return key.expires_at is not None and now >= key.expires_at


def describe(key: PolicyKey, max_parallel: int | None) -> dict:
    """The policy fields of ``GET /api/v1/key``: ``models`` (``["*"]`` for every model), ``expires_at`` (ISO 8601
    UTC, or null) and ``max_parallel`` (null: no cap)."""
    return {"models": list(key.models) if key.models is not None else ["*"],
            "expires_at": iso_utc(key.expires_at), "max_parallel": max_parallel}


def iso_utc(moment: datetime.datetime | None) -> str | None:
    """A stored naive UTC instant as ISO 8601 with its ``Z``."""
    return None if moment is None else moment.replace(microsecond=0).isoformat() + "Z"


def patterns(stored: str | None) -> tuple[str, ...] | None:
    """The stored allow-list as patterns (None: every model)."""
    return None if stored is None else tuple(stored.split(","))


# --------------------------------------------------------------------------------------------------
# Reading the CLI's options
# --------------------------------------------------------------------------------------------------

def parse_models(text: str) -> str | None:
    """Read ``--models``: comma-separated catalogue ids, ``*`` and ``?`` wildcards allowed; ``*`` alone (or
    with others) means every model. Returns the list as stored (None for every model).

    :raise ConfigurationError: for an empty list, an empty item, a character no catalogue id has, or a list too
        long to store.
    """
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ConfigurationError('--models needs at least one model id or pattern (`--models "*"` allows every '
                                 'model)')
    if "" in items:
        raise ConfigurationError(f"--models {text!r} has an empty item: separate ids with single commas")
    for item in items:
        if any(c.isspace() for c in item):
            raise ConfigurationError(f"--models: {item!r} has a space in it; catalogue ids have none")
    if "*" in items:
        return None
    unique = list(dict.fromkeys(items))
    stored = ",".join(unique)
    if len(stored) > MAX_MODELS_LEN:
        raise ConfigurationError(f"--models is {len(stored)} characters long; at most {MAX_MODELS_LEN} (use "
                                 f"wildcards such as deepseek-*)")
    return stored


def unmatched(stored: str | None, catalogue_ids) -> list[str]:
    """The patterns of an allow-list that match no catalogue model (likely typos, worth a warning)."""
    ids = list(catalogue_ids)
    return [p for p in (patterns(stored) or ()) if not any(fnmatchcase(i, p) for i in ids)]


def parse_expiry(text: str, tz: datetime.tzinfo, now: datetime.datetime) -> datetime.datetime | None:
    """Read ``--expires``: ``never``; a duration from ``now`` (``30d``, ``12h``, ``90m``, ``2w``, ``45s``); an ISO
    date (its midnight in ``tz``, the ``[limits] day_timezone``: ``2026-07-01`` stops the key as July begins); or
    an ISO date-time (in ``tz`` unless it has an offset or ``Z``). Returns naive UTC, as stored (None: never).

    :param now: aware, the current instant.
    :raise ConfigurationError: for anything else.
    """
    word = text.strip()
    if word.lower() == "never":
        return None
    match = _DURATION.match(word.lower())
    if match:
        amount = int(match.group(1))
        if amount <= 0:
            raise ConfigurationError(f"--expires {text!r}: a duration must be positive")
        try:
            moment = now + datetime.timedelta(**{_UNITS[match.group(2)]: amount})
        except OverflowError:
            raise ConfigurationError(f"--expires {text!r} is too far in the future") from None
        return _utc(moment)
    try:
        if len(word) == 10:
            day = datetime.date.fromisoformat(word)
            return _utc(datetime.datetime.combine(day, datetime.time(), tzinfo=tz))
        moment = datetime.datetime.fromisoformat(word)
    except ValueError:
        raise ConfigurationError(f"--expires {text!r} is not `never`, a duration (30d, 12h, 90m, 2w, 45s), an ISO "
                                 f"date (2026-07-01) or an ISO date-time (2026-07-01T18:00, with an offset or "
                                 f"in [limits] day_timezone)") from None
    return _utc(moment if moment.tzinfo is not None else moment.replace(tzinfo=tz))


def _utc(moment: datetime.datetime) -> datetime.datetime:
    return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)


def parse_max_parallel(text: str, allow_none: bool = False) -> int | None:
    """Read ``--max-parallel``: a positive number of requests in flight at once (``none``, on update: no cap).

    :raise ConfigurationError: for 0 (a key that can never call: ``keys disable``), negatives and non-numbers.
    """
    word = text.strip().lower()
    if allow_none and word == "none":
        return None
    also = " or none (no cap)" if allow_none else ""
    try:
        value = int(word)
    except ValueError:
        raise ConfigurationError(f"--max-parallel must be a positive number of requests{also}, not {text!r}") from None
    if value == 0:
        raise ConfigurationError("--max-parallel 0 would refuse every request of the key: to stop a key use "
                                 "`boundless keys disable NAME`")
    if value < 0 or value > 2**31 - 1:
        raise ConfigurationError(f"--max-parallel must be a positive number of requests{also}, not {text!r}")
    return value


__all__ = ["allows", "check_model", "describe", "expired", "iso_utc", "parse_expiry", "parse_max_parallel",
           "parse_models", "patterns", "unmatched"]
