"""app/policy.py: the allow-list's patterns and the CLI's readings of --models, --expires, --max-parallel."""
from __future__ import annotations

import datetime
import zoneinfo

import pytest

from app import policy
from app.errors import ConfigurationError
from app.errors import ModelNotAllowed
from app.keys import KeyInfo

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
NOW = datetime.datetime(2026, 5, 14, 10, 0, tzinfo=datetime.timezone.utc)


class M:
    def __init__(self, id: str) -> None:
        self.id = id


def _key(models=None, expires_at=None) -> KeyInfo:
    return KeyInfo(1, "k", "sk-x", None, None, models=policy.patterns(models), expires_at=expires_at)


def test_patterns_match_whole_ids_case_sensitively():
    key = _key("deepseek-*,gpt-4o-mini")
    assert [m for m in ("deepseek-chat", "deepseek-", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini-2", "DeepSeek-chat",
                        "x-deepseek-chat") if policy.allows(key, m)] == ["deepseek-chat", "deepseek-", "gpt-4o-mini"]
    assert policy.allows(_key(None), "anything")
    policy.check_model(key, M("deepseek-r1"))
    with pytest.raises(ModelNotAllowed) as refused:
        policy.check_model(key, M("gpt-4o"))
    assert (refused.value.status, refused.value.code, refused.value.param) == (403, "model_not_allowed", "model")
    assert "'gpt-4o'" in refused.value.message


@pytest.mark.parametrize("text, stored", [
    ("*", None), ("a,*", None), ("deepseek-*, gpt-4o-mini", "deepseek-*,gpt-4o-mini"), ("a,a,b", "a,b"),
])
def test_parse_models(text, stored):
    assert policy.parse_models(text) == stored


@pytest.mark.parametrize("text", ["", " , ", "a,,b", "a b", "x" * 1001])
def test_parse_models_refuses(text):
    with pytest.raises(ConfigurationError, match="--models"):
        policy.parse_models(text)


@pytest.mark.parametrize("text, expected", [
    ("30d", datetime.datetime(2026, 6, 13, 10, 0)), ("12h", datetime.datetime(2026, 5, 14, 22, 0)),
    ("90m", datetime.datetime(2026, 5, 14, 11, 30)), ("2w", datetime.datetime(2026, 5, 28, 10, 0)),
    ("2026-07-01", datetime.datetime(2026, 6, 30, 22, 0)),               # Paris midnight, in UTC
    ("2026-07-01T18:00", datetime.datetime(2026, 7, 1, 16, 0)),
    ("2026-07-01T18:00:00Z", datetime.datetime(2026, 7, 1, 18, 0)),
    ("2026-07-01T18:00+05:00", datetime.datetime(2026, 7, 1, 13, 0)), ("never", None), ("NEVER", None),
])
def test_parse_expiry(text, expected):
    assert policy.parse_expiry(text, PARIS, NOW) == expected


@pytest.mark.parametrize("text", ["0d", "tomorrow", "30x", "2026-13-01", "-1d", "99999999999w"])
def test_parse_expiry_refuses(text):
    with pytest.raises(ConfigurationError, match="--expires"):
        policy.parse_expiry(text, PARIS, NOW)


def test_expired_and_describe():
    moment = datetime.datetime(2026, 5, 14, 10, 0)
    assert policy.expired(_key(expires_at=moment), moment) and not policy.expired(
        _key(expires_at=moment), moment - datetime.timedelta(seconds=1))
    assert not policy.expired(_key(), moment)
    assert policy.describe(_key("a*", moment), 3) == {"models": ["a*"], "expires_at": "2026-05-14T10:00:00Z",
                                                     "max_parallel": 3}
    assert policy.describe(_key(), None) == {"models": ["*"], "expires_at": None, "max_parallel": None}


@pytest.mark.parametrize("text", ["0", "-2", "two", "none", "2147483648"])
def test_parse_max_parallel_refuses(text):
    with pytest.raises(ConfigurationError, match="max-parallel"):
        policy.parse_max_parallel(text)
    assert policy.parse_max_parallel("none", allow_none=True) is None and policy.parse_max_parallel(" 4 ") == 4
