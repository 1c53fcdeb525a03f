"""Settings read from the real environment keep the contract's variable formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from humanconnect.errors import ConfigError
from humanconnect.settings import load
from humanconnect.webhooks.signing import new_secret


def test_comma_separated_variables_read_as_the_contract_documents(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Lists are comma-separated (spaces and empty items ignored, never read as JSON), and
    the retry schedule is comma-separated seconds, every item required."""
    # Given: the variables set in the environment, and no .env in the working directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HUMANCONNECT_CORS_ORIGINS", " https://app.example.com ,,http://b:8080")
    monkeypatch.setenv("HUMANCONNECT_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_URLS", "https://a.example/h, https://a.example/h,")
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_SECRET", new_secret())
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE", "0, 1.5,60")
    # When / Then
    s = load()
    assert s.cors_origins == ["https://app.example.com", "http://b:8080"]
    assert s.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]
    assert s.webhook_urls == ["https://a.example/h"]
    assert s.webhook_retry_schedule == (0, 1.5, 60)

    # A JSON list is not a list of URLs here, and an empty wait is not zero.
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_URLS", '["https://a.example/h"]')
    with pytest.raises(ConfigError, match="HUMANCONNECT_WEBHOOK_URLS: .*URL number 1"):
        load()
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_URLS", "https://a.example/h")
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE", "0,,5")
    with pytest.raises(ConfigError, match="HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE: .*seconds"):
        load()


def test_unset_lists_are_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Unset or empty list variables mean none, and the schedule has its documented default."""
    monkeypatch.chdir(tmp_path)
    for name in ("HUMANCONNECT_CORS_ORIGINS", "HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HUMANCONNECT_TRUSTED_PROXIES", "")
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_URLS", "")
    s = load()
    assert (s.cors_origins, s.trusted_proxies, s.webhook_urls) == ([], [], [])
    assert s.webhook_retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
