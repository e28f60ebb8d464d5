"""The refusal counts: one atomic upsert per refusal on every database, and which reports count."""
from __future__ import annotations

import datetime

from app.server.refusals import count
from app.server.refusals import reason_of
from app.server.reporting import Report
from app.store import schema
from app.store.models import ApiKey
from app.store.models import Refusal
from app.store.models import db
from app.store.models import make_database


def test_count_upserts_per_key_day_model_and_reason(database):
    db.initialize(make_database(database.url))
    try:
        with db.connection_context():
            schema.create()
            a = ApiKey.create(name="a", key_hash="a" * 64, prefix="sk-a").id
            b = ApiKey.create(name="b", key_hash="b" * 64, prefix="sk-b").id
            day1, day2 = datetime.date(2026, 1, 1), datetime.date(2026, 1, 2)
            for key, day, model, reason in [(a, day1, "m", "rate_limited")] * 3 + [
                    (a, day1, "m", "insufficient_quota"), (a, day2, "m", "rate_limited"),
                    (a, day1, "", "rate_limited"), (b, day1, "m", "rate_limited")]:
                count(key, model, reason, day)
            rows = sorted((r.key_id, str(r.day), r.model, r.reason, r.count) for r in Refusal.select())
    finally:
        db.close_all()
    assert rows == [(a, "2026-01-01", "", "rate_limited", 1), (a, "2026-01-01", "m", "insufficient_quota", 1),
                    (a, "2026-01-01", "m", "rate_limited", 3), (a, "2026-01-02", "m", "rate_limited", 1),
                    (b, "2026-01-01", "m", "rate_limited", 1)]


def test_only_refusals_of_a_known_key_count():
    def report(status, key_id=7, refused=None, outcome=None):
        return Report(ts=0, method="POST", path="/", route="/", status=status, key_id=key_id, refused=refused,
                      outcome=outcome)

    assert reason_of(report(429, refused="minute")) == reason_of(report(429, refused="day")) == "rate_limited"
    assert reason_of(report(402, refused="credit")) == "insufficient_quota"
    assert reason_of(report(401)) == "key_disabled"
    assert reason_of(report(400)) == "invalid_request"
    assert reason_of(report(429)) is None                      # the provider's 429, not our limits
    assert reason_of(report(401, key_id=None)) is None         # unknown key: not attributable
    assert reason_of(report(502, outcome="upstream_error")) is None    # reached the provider: in the ledger
    assert reason_of(report(200)) is None
