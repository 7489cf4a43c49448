"""Worker settings: the checks made at start-up."""

from __future__ import annotations

import pytest

from producer import ConfigError
from worker.settings import load_settings


def test_visibility_timeout_must_exceed_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RENDER_TASK_TIME_LIMIT", "3600")
    monkeypatch.setenv("RENDER_VISIBILITY_TIMEOUT", "3600")
    with pytest.raises(ConfigError, match=r"RENDER_VISIBILITY_TIMEOUT \(3600 s\) must exceed RENDER_TASK_TIME_LIMIT"):
        load_settings()
    monkeypatch.setenv("RENDER_VISIBILITY_TIMEOUT", "7200")
    settings = load_settings()
    assert (settings.task_time_limit, settings.visibility_timeout) == (3600, 7200)


def test_defaults_are_safe_together() -> None:
    settings = load_settings()
    assert settings.visibility_timeout > settings.task_time_limit + 60
    assert settings.lease_ttl < settings.task_time_limit
