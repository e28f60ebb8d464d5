"""
app.accounting.billing
~~~~~~~~~~~~~~~~~~~~~~

Reserve the worst case before the upstream is called; settle to the real cost when the request ends.

* **Reserve** (paid models): one conditional ``UPDATE api_key SET balance = balance - worst WHERE balance >=
  worst`` plus a ``held`` ledger row, in one transaction. Concurrent requests of one key, in any number of
  workers or gateways, therefore never hold more than the balance. Zero rows updated means 402. The worst
  case is :func:`prompt_upper_bound` prompt tokens (the text of the messages and tools plus a fixed overhead:
  see there why no provider counts more) and the caller's ``max_completion_tokens``/``max_tokens`` (else the
  model's ``max_output_tokens``) completion tokens, at the model's prices.
* **Settle**: in one transaction the ``held`` row becomes ``settled`` with its charge, and the unused part of the
  reservation goes back to the balance. Settling twice does nothing (the ``state = 'held'`` guard).
* **The charge**: the upstream's reported usage at the model's prices, rounded up to a micro-credit. A request
  that failed before the upstream produced anything costs nothing. A stream that ended without usage (hang-up,
  cut) is *estimated*: prompt = request bytes / 4, completion = content events delivered; the row says so.
  The charge never exceeds reservation + what the balance still holds, so no balance ever goes below zero.

Free models reserve nothing and write their ledger row when they settle. No Flask here.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from dataclasses import field

from peewee import PeeweeException

from ..catalog import Model
from . import budget
from .credits import amount
from .credits import cost
from .credits import to_credits
from ..errors import BudgetExceeded
from ..errors import InsufficientCredits
from ..errors import ServiceUnavailable
from .ledger_sql import give_back_args
from .ledger_sql import lock_key
from .ledger_sql import roll_up_args
from .ledger_sql import statements
from .ledger_sql import take_args
from ..store.models import ApiKey
from ..store.models import Usage
from ..store.models import db
from ..store.models import run_write
from ..store.models import utcnow

log = logging.getLogger("boundless")

#: Tokens added to the worst case per image part: a short image URL can cost far more tokens than bytes.
IMAGE_TOKENS = 1_600

#: Tokens a chat template adds around each message: its role header, separators, the end-of-turn marker.
MESSAGE_TOKENS = 8

#: Tokens a chat template adds once per request: begin-of-text, the reply's header, a default system preamble.
REQUEST_TOKENS = 32

#: The largest ``max_tokens`` / ``max_completion_tokens`` accepted: the ledger's token columns are 32-bit
#: integers on PostgreSQL and MySQL, and no model generates more.
MAX_TOKENS = 2**31 - 1

#: The largest reservation the database can hold (a BIGINT); a larger worst case is refused with 402 unwritten.
_MAX_RESERVATION = 2**63 - 1


def new_request_id() -> str:
    """``req_`` + the time in ms (12 hex digits) + 80 random bits: unique, and in time order, so the ledger's
    unique index on it grows at its end instead of dirtying a random page of a large index per request."""
    return f"req_{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def prompt_upper_bound(body: dict) -> int:
    """A prompt token count no provider exceeds for this chat body (validated: ``messages`` a list of objects).

    Why it is safe: a byte-level BPE tokenizer (every GPT, Llama, Qwen, DeepSeek...) spends at least one UTF-8
    byte of text per token, so text of N bytes is at most N tokens; only what the provider adds around the text
    is more, and that is bounded here:

    * each message: the UTF-8 bytes of every string in its ``content`` (text parts, and image URLs too) plus
      :data:`IMAGE_TOKENS` per image part; its other fields (role, name, tool calls with their arguments, tool
      call ids...) count as the bytes of their JSON, so even a template that renders them with ``tojson``
      (quotes escaped) stays within the bound; plus :data:`MESSAGE_TOKENS` for the template's role header
      and end-of-turn markers;
    * every other field that is an object or array (tools, functions, response_format, tool_choice...) counts
      as its JSON written with spaces (``", "``, ``": "``), which is how templates that render tool
      definitions into the prompt write them; a string field counts its bytes; a number or boolean at the top
      level is a setting (max_tokens, temperature, n...), never prompt text; ``model`` is not sent as text;
    * plus :data:`REQUEST_TOKENS` for the template's begin-of-text, the reply's header and a default system
      preamble.

    The JSON punctuation around message text (quotes, keys, commas, escapes) is not counted: it is not part of
    the prompt. A short English message therefore reserves a few times its real cost, no longer ten.
    """
    total = REQUEST_TOKENS
    for name, value in body.items():
        if name == "messages":
            for message in value:
                total += MESSAGE_TOKENS + _message_bytes(message)
        elif name == "model":
            continue
        elif isinstance(value, str):
            total += _utf8_len(value)
        elif isinstance(value, (dict, list)):
            total += _spaced_json_len(value)
    return total


def _message_bytes(message: dict) -> int:
    total = 0
    for name, value in message.items():
        if isinstance(value, str):
            total += _utf8_len(value)
        elif name == "content":
            total += _content_bytes(value)
        elif value is not None:
            total += _spaced_json_len(value)
    return total


def _content_bytes(content) -> int:
    """The bytes of every string (and number) inside a message's content, plus IMAGE_TOKENS per image part."""
    total = 0
    stack = [content]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            total += _utf8_len(node)
        elif isinstance(node, dict):
            if "image_url" in node or node.get("type") == "image":     # OpenAI's parts; Anthropic's image blocks
                total += IMAGE_TOKENS
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            total += len(repr(node))
    return total


def _utf8_len(text: str) -> int:
    # surrogatepass: a lone surrogate (valid JSON) counts its 3 bytes instead of failing
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _spaced_json_len(value) -> int:
    return _utf8_len(json.dumps(value, ensure_ascii=False))


def _limit_field(body: dict) -> tuple[str, int] | None:
    """The caller's completion limit as (field name, value), if it gave a usable one."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def max_completion_tokens(body: dict, model: Model) -> int:
    asked = _limit_field(body)
    return asked[1] if asked else model.max_output_tokens


@dataclass(frozen=True)
class Bounds:
    """The worst case of a request of an API other than chat (``app.accounting.usage`` computes it): at most
    ``prompt`` prompt tokens and ``completion`` completion tokens. ``limit_field`` names the body's field that
    caps the completion (the 402's advice names it), None if none does."""

    prompt: int
    completion: int
    limit_field: str | None = "max_tokens"


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
    #: Who asked, for logs and metrics (key name and prefix, method, path, remote address).
    context: dict = field(default_factory=dict)
    #: The ledger row's ``created_at`` (naive UTC): whether the settlement moves the key's budget period.
    created_at: datetime.datetime | None = None


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
    #: (charge, prompt_tokens, completion_tokens, estimated) as settle() wrote them to the ledger.
    settled: tuple[int, int, int, bool] | None = None
    #: The catalogue model that answered (the one asked for, or a fallback model): its prices are charged.
    model: Model | None = None
    provider: str | None = None         # the provider that answered
    #: Every upstream call the request took (app/upstream/routing.py), for the ledger, log and metrics.
    attempts: list[dict] = field(default_factory=list)


def reserve(key_id: int, model: Model, body: dict, raw_body: bytes, stream: bool, request_id: str,
            bounds: Bounds | None = None, *, tz: datetime.tzinfo = datetime.timezone.utc) -> Lease:
    """Hold the worst-case cost of a request on the key's balance, and on its budget if it has one.

    :param bounds: the worst case in tokens, for APIs other than chat (``app.accounting.usage``); None: a chat
        body's, from :func:`prompt_upper_bound` and :func:`max_completion_tokens`.
    :param tz: ``[limits] day_timezone``, where the budget's calendar periods begin (``state().budget_tz``).
    :raise InsufficientCredits: the balance does not cover the worst case; nothing was changed.
    :raise BudgetExceeded: the key's budget for this period does not; nothing was changed.
    :raise ServiceUnavailable: the database is unreachable.
    """
    lease = Lease(request_id=request_id, key_id=key_id, model=model, stream=stream, prompt_bytes=len(raw_body))
    prompt, completion, worst, priciest = _worst_case(model, body, bounds)
    now = datetime.datetime.now(datetime.timezone.utc)      # one instant for the row and the budget's period
    if worst > _MAX_RESERVATION:         # no balance can hold it, and the database could not even store it
        return _refuse(key_id, prompt, completion, worst, priciest, body, bounds, now, tz)
    sql = statements(db)
    lease.created_at = created = now.replace(tzinfo=None)
    hold = (request_id, key_id, model.id, created, "held", stream, worst, 0, 0, 0, False, "", OWNER.get())
    take = take_args(worst, key_id, budget.periods(now, tz)) if worst else ()

    def take_and_hold(execute) -> int:
        taken = execute(sql.take, take).rowcount if worst else 1
        if taken == 1:          # the row exists from now on, so even a crashed worker leaves a trace
            execute(sql.hold, hold)
        return taken

    try:
        taken = run_write(take_and_hold)
    except PeeweeException as err:
        raise ServiceUnavailable("The credit database is unavailable; try again shortly.") from err
    if taken != 1:
        return _refuse(key_id, prompt, completion, worst, priciest, body, bounds, now, tz)
    lease.reserved = worst
    return lease


def _worst_case(model: Model, body: dict, bounds: Bounds | None) -> tuple[int, int, int, Model]:
    """(prompt bound, completion bound, cost, model) for the most expensive model that may answer: the one
    asked for or one of its fallback models (free models: nothing). ``bounds``: the endpoint's own worst case
    in tokens (None: a chat body's)."""
    prompt = completion = worst = 0
    priciest = model
    prompt_bound = None
    for candidate in (model, *model.fallbacks):
        if not candidate.paid:
            continue
        if bounds is not None:
            p, c = bounds.prompt, bounds.completion
        else:
            prompt_bound = prompt_upper_bound(body) if prompt_bound is None else prompt_bound
            p, c = prompt_bound, max_completion_tokens(body, candidate)
        price = cost(p, c, candidate.input_price, candidate.output_price)
        if price > worst:
            prompt, completion, worst, priciest = p, c, price, candidate
    return prompt, completion, worst, priciest


def _refuse(key_id: int, prompt: int, completion: int, worst: int, model: Model, body: dict,
            bounds: Bounds | None, now: datetime.datetime, tz: datetime.tzinfo):
    """:raise InsufficientCredits: with the balance and the largest limit it covers, or
    :raise BudgetExceeded: when the balance covers it but the key's budget for the period does not."""
    try:
        row = ApiKey.get_or_none(ApiKey.id == key_id)
    except PeeweeException as err:
        raise ServiceUnavailable("The credit database is unavailable; try again shortly.") from err
    balance = row.balance if row is not None else 0
    field = bounds.limit_field if bounds is not None else "max_tokens"
    if row is not None and row.budget is not None and balance >= worst:
        raise _over_budget(row, worst, model, now, tz, field)
    raise InsufficientCredits(_refusal(balance, prompt, completion, worst, model, body, field), param=field)


def _over_budget(row: ApiKey, worst: int, model: Model, now: datetime.datetime, tz: datetime.tzinfo,
                 field: str | None = "max_tokens") -> BudgetExceeded:
    spent = budget.spent_now(row, budget.periods(now, tz))
    end = budget.period_end(row.budget_period, now, tz)
    retry = max(1, math.ceil((end - now).total_seconds()))
    fewer = f"ask for fewer {field}, or " if field else ""
    return BudgetExceeded(
        f"Budget exceeded: this request to {model.id} may cost up to {to_credits(worst)} credits, and this key has "
        f"spent {to_credits(spent)} of its budget of {to_credits(row.budget)} credits this {row.budget_period}. "
        f"The budget resets at {end.isoformat()} (Retry-After: {retry}); {fewer}ask the "
        f"gateway's operator for a larger budget.", param=field, headers={"Retry-After": str(retry)})


def _refusal(balance: int, prompt: int, completion: int, worst: int, model: Model, body: dict,
             field: str | None = "max_tokens") -> str:
    msg = (f"Insufficient credits: this request to {model.id} may cost up to {to_credits(worst)} credits "
           f"({prompt} prompt tokens at most, {completion} completion tokens), and the key's balance is "
           f"{to_credits(balance)}.")
    if model.output_price > 0 and field is not None:
        # The limit is a top-level number, which the prompt bound does not count: asking for it changes
        # nothing else, so the same request with this limit is admitted.
        asked = _limit_field(body) if field == "max_tokens" else None
        name = asked[0] if asked else field
        n = min(MAX_TOKENS, max(0, int((balance - prompt * model.input_price) // model.output_price)))
        if n > 0:
            return msg + f" The balance covers {name}={n}; ask for that or less, or top up."
    return msg + " Top up the key to use this model."


def charge_for(lease: Lease, result: Outcome) -> tuple[int, int, int, bool]:
    """(charge, prompt_tokens, completion_tokens, estimated) for a finished request, at the prices of the
    model that answered."""
    model = result.model or lease.model
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
    """A reported token count as the ledger can store it: 0 unless a positive integer, at most MAX_TOKENS
    (an upstream that reports more is wrong, and a larger value would make the settlement fail forever)."""
    return min(value, MAX_TOKENS) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def settle(lease: Lease, result: Outcome) -> int:
    """Write the ledger row and give back the unused reservation, once; return the charge in micro-credits."""
    if lease.settled:
        return 0
    charge, pt, ct, estimated = charge_for(lease, result)
    touches_key = bool(lease.reserved or charge)      # a free request leaves the key's row alone
    sql = statements(db)
    reserved, key_id, request_id = lease.reserved, lease.key_id, lease.request_id
    created_at = lease.created_at or utcnow()     # set by reserve; the row's day in the roll-up

    def settle_rows(execute) -> int | None:
        """The final charge, or None if the row was settled already."""
        if touches_key:
            lock_key(db, execute, key_id)
        claimed = execute(sql.settle_row, (
            "settled", min(charge, reserved), pt, ct, estimated, result.status, result.outcome[:24],
            result.latency_ms, result.ttfb_ms, *_answered_by(result), request_id, "held")).rowcount
        if claimed != 1:
            return None
        final = charge
        if charge > reserved:            # rare: the usage beat the worst-case estimate
            available = execute(sql.balance, (key_id,)).fetchone()
            extra = min(charge - reserved, available[0] if available else 0)
            if extra:
                execute(sql.take_up_to, (extra, key_id))
            final = reserved + extra
            execute(sql.set_charge, (final, request_id))
        if touches_key:
            execute(sql.give_back, give_back_args(reserved - min(final, reserved), final, reserved,
                                                  lease.created_at, key_id))
        execute(sql.roll_up, roll_up_args(key_id, created_at, lease.model.id, pt, ct, final, estimated))
        return final

    final = run_write(settle_rows, own_connection=True)
    if final is None:
        lease.settled = True
        return 0
    charge = final
    lease.settled = True                 # only once committed: a failed attempt can be made again
    result.settled = (charge, pt, ct, estimated)
    return charge


def _answered_by(result: Outcome) -> tuple[str, str, int]:
    """(answered model, provider, upstream calls) for the ledger row."""
    return ((result.model.id if result.model else "")[:200], (result.provider or "")[:100],
            min(len(result.attempts), 32767))


#: Settlements that failed (the database was unreachable), retried by the worker's heartbeat thread, so a
#: reservation is never left held by a worker that is still alive.
PENDING: deque[tuple[Lease, Outcome]] = deque()


def settle_or_defer(lease: Lease, result: Outcome) -> int:
    """:func:`settle`, or, if the database fails, queue it for :func:`retry_pending` (never raises for that)."""
    try:
        return settle(lease, result)
    except PeeweeException:
        log.exception("settling %s failed; will retry", lease.request_id)
        PENDING.append((lease, result))
        return 0


def retry_pending() -> int:
    """Try the deferred settlements once more; return how many went through."""
    done = 0
    for _ in range(len(PENDING)):
        lease, result = PENDING.popleft()
        try:
            settle(lease, result)
            done += 1
        except PeeweeException:
            PENDING.append((lease, result))
            break                        # still down: keep the rest for the next beat
    return done


class _Owner:
    """``<instance>:<pid>`` of this worker, stamped on held rows so that a dead worker's rows can be found.

    The instance id is made by the gunicorn master at start (``BOUNDLESS_INSTANCE_ID``, random) and shared by
    its workers, so it is unique per running gateway even where host names and pids repeat (containers).
    """

    def __init__(self) -> None:
        self._value = ""
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._value = ""

    def get(self) -> str:
        if not self._value:
            instance = os.environ.get("BOUNDLESS_INSTANCE_ID") or f"p{uuid.uuid4().hex[:12]}"
            self._value = f"{instance[:40]}:{os.getpid()}"
        return self._value


OWNER = _Owner()


def settle_lost(owners: list[str]) -> int:
    """Settle the held rows of workers that died without settling (kill -9, OOM, a crashed box).

    Policy: such a request is charged nothing and its whole reservation goes back to the balance. A crash is
    the gateway's fault, so the caller does not pay for it; the row says ``outcome = worker_lost``.
    Returns the number of rows settled.
    """
    # Read every row before the first write. A query still being iterated keeps its read snapshot open, and on
    # SQLite in WAL mode a connection whose snapshot is older than another process's commit cannot start a write
    # transaction ("database is locked", whatever the busy timeout): the workers commit all the time.
    rows = list(Usage.select(Usage.id, Usage.key, Usage.reserved, Usage.created_at, Usage.model).where(
        (Usage.state == "held") & (Usage.owner.in_(owners))).tuples())
    sql = statements(db)
    n = 0
    for usage_id, key_id, reserved, created_at, model in rows:
        with db.atomic():
            if reserved:
                lock_key(db, db.execute_sql, key_id)
            if Usage.update(state="settled", charge=0, estimated=True, outcome="worker_lost").where(
                    (Usage.id == usage_id) & (Usage.state == "held")).execute() == 1:
                # All of it goes back, to the budget's count too if the row was made in the period it counts.
                db.execute_sql(sql.give_back, give_back_args(reserved, 0, reserved, created_at, key_id))
                db.execute_sql(sql.roll_up, roll_up_args(key_id, created_at, model, 0, 0, 0, True))
                n += 1
    return n


def key_summary(key_id: int, tz: datetime.tzinfo = datetime.timezone.utc) -> dict:
    """Name, balance, spent, and the budget's fields (``budget``, ``budget_period``, ``budget_spent``,
    ``budget_resets_at``: null without a budget) of a key, read now (never cached)."""
    row = ApiKey.get_by_id(key_id)
    return {"name": row.name, "balance": amount(row.balance), "spent": amount(row.spent),
            **budget.summary(row, datetime.datetime.now(datetime.timezone.utc), tz)}
