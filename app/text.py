"""
app.text
~~~~~~~~

Small helpers for the words of messages (errors, the CLI), so that every message reads right for any number.
"""
from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``"1 request"``, ``"2 requests"``: the number and the noun, singular when the number is 1.

    :param many: the plural when it is not ``noun + "s"``.
    """
    return f"{n} {noun if n == 1 else (many or noun + 's')}"
