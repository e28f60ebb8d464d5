"""
app.text
~~~~~~~~

Small helpers for the words of messages (errors, the CLI), so that every message reads right for any number.
"""
from __future__ import annotations

from urllib.parse import urlsplit
from urllib.parse import urlunsplit


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``"1 request"``, ``"2 requests"``: the number and the noun, singular when the number is 1.

    :param many: the plural when it is not ``noun + "s"``.
    """
    return f"{n} {noun if n == 1 else (many or noun + 's')}"


def redact(url: str) -> str:
    """A database or storage URL fit to print or log: its password (if any) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:                 # not a URL at all: say nothing of what it holds
        return "<unparseable URL>"
