"""
app.accounting.credits
~~~~~~~~~~~~~~~~~~~~~~

Money arithmetic: credits (decimals for people) and micro-credits (integers for the database).

Prices are credits per 1M tokens, so one token at price P costs exactly P micro-credits. A charge is the
exact decimal cost rounded *up* to a whole micro-credit, once per request.
"""
from __future__ import annotations

import math
from decimal import Decimal
from decimal import InvalidOperation

from ..errors import ConfigurationError

MICRO = 1_000_000

#: The largest amount accepted, in micro-credits: JSON readers that turn amounts into numbers stay exact below 2**53,
#: and a database BIGINT never overflows.
MAX_MICRO = 2**53 - 1


def to_micro(amount: Decimal | str | int) -> int:
    """Parse a credit amount ("12.5") into micro-credits; refuse more than 6 decimals."""
    try:
        value = Decimal(str(amount))
    except InvalidOperation as err:
        raise ConfigurationError(f"not an amount of credits: {amount!r}") from err
    if not value.is_finite():
        raise ConfigurationError(f"not an amount of credits: {amount!r}")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise ConfigurationError(f"{amount} has more than 6 decimals (the unit is one micro-credit)")
    if abs(micro) > MAX_MICRO:
        raise ConfigurationError(f"{amount} is too large (at most {to_credits(MAX_MICRO)} credits)")
    return int(micro)


def to_credits(micro: int) -> Decimal:
    return Decimal(micro) / MICRO


def amount(micro: int) -> str:
    """A micro-credit amount as every JSON answer and ``--json`` output shows it: a decimal string of
    credits, never with an exponent (59 -> ``"0.000059"``, not ``5.9e-05``), with no trailing zeros
    (1_500_000 -> ``"1.5"``, 100_000_000 -> ``"100"``). A string, so that no JSON reader rounds it."""
    return format(to_credits(int(micro)).normalize(), "f")


def cost(prompt_tokens: int, completion_tokens: int, input_price: Decimal, output_price: Decimal) -> int:
    """The charge, in micro-credits, for a number of tokens at per-1M-token prices."""
    return math.ceil(prompt_tokens * input_price + completion_tokens * output_price)
