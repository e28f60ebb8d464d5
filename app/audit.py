"""
app.audit
~~~~~~~~~

The audit log: every change made through the admin API or the web console, with who made it (``key:NAME``
for an admin key, ``console:USER`` for a console user), what it was, to what, and when. No Flask here.

:func:`record` is called inside the transaction of the change it describes, so a change and its entry are
committed together or not at all. The detail never holds a key: only the fields that were changed.
"""
from __future__ import annotations

import json

from .store.models import AuditEntry
from .store.models import utcnow


def record(actor: str, action: str, target: str = "", detail: dict | None = None) -> AuditEntry:
    """Write one entry; call it inside the change's ``db.atomic()``."""
    text = json.dumps(detail or {}, sort_keys=True, default=str)
    return AuditEntry.create(at=utcnow(), actor=actor[:120], action=action[:40], target=target[:200], detail=text)


def as_dict(entry: AuditEntry) -> dict:
    """An entry as the API and ``boundless audit --json`` show it (UTC time in ISO 8601)."""
    try:
        detail = json.loads(entry.detail) if entry.detail else {}
    except ValueError:
        detail = {"text": entry.detail}
    return {"id": entry.id, "at": entry.at.isoformat(timespec="seconds") + "Z", "actor": entry.actor,
            "action": entry.action, "target": entry.target, "detail": detail}


def recent(limit: int = 100, offset: int = 0, actor: str | None = None, target: str | None = None,
           action: str | None = None) -> list[AuditEntry]:
    """The newest entries first, optionally only one actor's, one target's or one action's."""
    query = AuditEntry.select().order_by(AuditEntry.id.desc())
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if target:
        query = query.where(AuditEntry.target == target)
    if action:
        query = query.where(AuditEntry.action == action)
    return list(query.limit(limit).offset(offset))


__all__ = ["as_dict", "recent", "record"]
