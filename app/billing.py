"""
app.billing
~~~~~~~~~~~

Reserve the worst case before the upstream is called; settle to the real cost when the request ends.

* **Reserve** (paid models): one conditional ``UPDATE api_key SET balance = balance - worst WHERE balance >=
  worst`` plus a ``held`` ledger row, in one transaction. Concurrent requests of one key, in any number of
  workers or gateways, therefore never hold more than the balance. Zero rows updated means 402.
* **Settle**: in one transaction the ``held`` row becomes ``settled`` with its charge, and the unused part of the
  reservation goes back to the balance. Settling twice does nothing (the ``state = 'held'`` guard).
* **The charge**: the upstream's reported usage at the model's prices, rounded up to a micro-credit. A request
  that failed before the upstream produced anything costs nothing. A stream that ended without usage (hang-up,
  cut) is *estimated*: prompt = request bytes / 4, completion = content events delivered; the row says so.
  The charge never exceeds reservation + what the balance still holds, so no balance ever goes below zero.

Free models reserve nothing and write their ledger row when they settle. No Flask here.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from dataclasses import field

from peewee import PeeweeException

from .catalog import Model
from .credits import as_number
from .credits import cost
from .credits import to_credits
from .errors import InsufficientCredits
from .errors import ServiceUnavailable
from .models import ApiKey
from .models import Usage
from .models import db
from .models import utcnow

#: Tokens added to the worst case per image part: a short image URL can cost far more tokens than bytes.
IMAGE_TOKENS = 1_600


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def prompt_upper_bound(raw_body: bytes) -> int:
    """A prompt token count no tokenizer exceeds: byte-level BPE spends at least one byte per token."""
    return len(raw_body) + IMAGE_TOKENS * raw_body.count(b'"image_url"')


def max_completion_tokens(body: dict, model: Model) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return model.max_output_tokens


@dataclass
class Lease:
    """One request's claim on a key's credit, from reserve to settle."""

    request_id: str
    key_id: int
    model: Model
    stream: bool
    prompt_bytes: int
    reserved: int = 0
    settled: bool = False


@dataclass
class Outcome:
    """What the upstream did, as observed by the relay."""

    status: int | None = None           # upstream HTTP status, None if it never answered
    usage: dict | None = None           # the upstream's usage object, if it sent one
    delivered_events: int = 0           # content events handed to the caller
    produced: bool = False              # the upstream produced any answer at all
    outcome: str = "complete"
    ttfb_ms: float | None = None
    latency_ms: float | None = None
    extra: dict = field(default_factory=dict)


def reserve(key_id: int, model: Model, body: dict, raw_body: bytes, stream: bool, request_id: str) -> Lease:
    """Hold the worst-case cost of a request on the key's balance.

    :raise InsufficientCredits: the balance does not cover the worst case; nothing was changed.
    :raise ServiceUnavailable: the database is unreachable.
    """
    lease = Lease(request_id=request_id, key_id=key_id, model=model, stream=stream, prompt_bytes=len(raw_body))
    if not model.paid:
        return lease
    prompt = prompt_upper_bound(raw_body)
    completion = max_completion_tokens(body, model)
    worst = cost(prompt, completion, model.input_price, model.output_price)
    try:
        with db.atomic():
            taken = (ApiKey.update(balance=ApiKey.balance - worst)
                     .where((ApiKey.id == key_id) & (ApiKey.balance >= worst))
                     .execute())
            if taken == 1:
                Usage.insert(request_id=request_id, key=key_id, model=model.id, state="held",
                             stream=stream, reserved=worst).execute()
        if taken != 1:
            balance = ApiKey.select(ApiKey.balance).where(ApiKey.id == key_id).scalar() or 0
    except PeeweeException as err:
        raise ServiceUnavailable("The credit database is unavailable; try again shortly.") from err
    if taken != 1:
        raise InsufficientCredits(_refusal(balance, prompt, completion, worst, model), param="max_tokens")
    lease.reserved = worst
    return lease


def _refusal(balance: int, prompt: int, completion: int, worst: int, model: Model) -> str:
    msg = (f"Insufficient credits: this request to {model.id} may cost up to {to_credits(worst)} credits "
           f"({prompt} prompt tokens at most, {completion} completion tokens), and the key's balance is "
           f"{to_credits(balance)}.")
    left = balance - math.ceil(prompt * model.input_price)
    if model.output_price > 0 and left > 0:
        fits = int(left // model.output_price)
        if fits > 0:
            return msg + f" The balance covers max_tokens={fits}; ask for that or less, or top up."
    return msg + " Top up the key to use this model."


def charge_for(lease: Lease, result: Outcome) -> tuple[int, int, int, bool]:
    """(charge, prompt_tokens, completion_tokens, estimated) for a finished request."""
    model = lease.model
    usage = result.usage
    if usage:
        pt = _int(usage.get("prompt_tokens"))
        ct = _int(usage.get("completion_tokens"))
        return cost(pt, ct, model.input_price, model.output_price), pt, ct, False
    if not result.produced:
        return 0, 0, 0, False
    pt = math.ceil(lease.prompt_bytes / 4)
    ct = result.delivered_events
    return cost(pt, ct, model.input_price, model.output_price), pt, ct, True


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def settle(lease: Lease, result: Outcome) -> int:
    """Write the ledger row and give back the unused reservation, once; return the charge in micro-credits."""
    if lease.settled:
        return 0
    lease.settled = True
    charge, pt, ct, estimated = charge_for(lease, result)
    row = dict(state="settled", prompt_tokens=pt, completion_tokens=ct, estimated=estimated,
               status=result.status, outcome=result.outcome[:24], latency_ms=result.latency_ms,
               ttfb_ms=result.ttfb_ms)
    with db.connection_context(), db.atomic():
        if not lease.model.paid:
            Usage.insert(request_id=lease.request_id, key=lease.key_id, model=lease.model.id, stream=lease.stream,
                         created_at=utcnow(), charge=0, **row).execute()
            return 0
        claimed = (Usage.update(charge=min(charge, lease.reserved), **row)
                   .where((Usage.request_id == lease.request_id) & (Usage.state == "held"))
                   .execute())
        if claimed != 1:
            return 0
        if charge > lease.reserved:      # rare: the usage beat the worst-case estimate
            charge = lease.reserved + _take_extra(lease.key_id, charge - lease.reserved)
            Usage.update(charge=charge).where(Usage.request_id == lease.request_id).execute()
        (ApiKey.update(balance=ApiKey.balance + (lease.reserved - min(charge, lease.reserved)),
                       spent=ApiKey.spent + charge)
         .where(ApiKey.id == lease.key_id)
         .execute())
    return charge


def _take_extra(key_id: int, extra: int) -> int:
    """Take up to ``extra`` more from the balance (inside the settling transaction); return what was taken."""
    query = ApiKey.select(ApiKey.balance).where(ApiKey.id == key_id)
    if db.for_update:
        query = query.for_update()
    available = query.scalar() or 0
    take = min(extra, available)
    if take:
        ApiKey.update(balance=ApiKey.balance - take).where(ApiKey.id == key_id).execute()
    return take


def key_summary(key_id: int) -> dict:
    row = ApiKey.get_by_id(key_id)
    return {"name": row.name, "balance": as_number(row.balance), "spent": as_number(row.spent)}
