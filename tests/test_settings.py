"""Settings read from the real environment keep the contract's variable formats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from humanconnect.errors import ConfigError
from humanconnect.settings import load
from humanconnect.webhooks.signing import new_secret
from tests.support.env import ROOT


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


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {
                "REDIS_URL": "redis://r:6379/0",
                "REDIS_SENTINELS": "s:26379",
                "REDIS_SENTINEL_MASTER": "m",
            },
            "set REDIS_URL or REDIS_SENTINELS, not both",
        ),
        ({"REDIS_SENTINELS": "s:26379"}, "REDIS_SENTINEL_MASTER is required with REDIS_SENTINELS"),
        (
            {"REDIS_SENTINELS": "s:26379", "REDIS_SENTINEL_MASTER": " "},
            "REDIS_SENTINEL_MASTER is required",
        ),
        ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not"),
        (
            {"REDIS_SENTINELS": "s:26379,s2", "REDIS_SENTINEL_MASTER": "m"},
            "REDIS_SENTINELS: .*'s2'",
        ),
        ({"REDIS_SENTINELS": "s:0", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS: .*'s:0'"),
        (
            {"REDIS_SENTINELS": ":26379", "REDIS_SENTINEL_MASTER": "m"},
            "REDIS_SENTINELS: .*':26379'",
        ),
        ({"REDIS_SENTINELS": "redis://s:26379", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS: "),
        ({"REDIS_SENTINELS": "s 1:26379", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS: "),
        ({"REDIS_SENTINELS": "[]:26379", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS: "),
        ({"REDIS_URL": "r:6379"}, "REDIS_URL: .*redis://"),
        ({"REDIS_DB": "-1"}, "REDIS_DB: "),
        ({"HUMANCONNECT_REDIS_MIN_REPLICAS": "two"}, "HUMANCONNECT_REDIS_MIN_REPLICAS: "),
        ({"HUMANCONNECT_REDIS_REPLICA_TIMEOUT_MS": "0"}, "HUMANCONNECT_REDIS_REPLICA_TIMEOUT_MS: "),
    ],
)
def test_a_bad_redis_configuration_is_one_line_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], says: str
) -> None:
    """Where Redis is comes from REDIS_URL or from the Sentinels, never both or half of one."""
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=says) as refused:
        load()
    assert "\n" not in str(refused.value)


def test_sentinels_and_the_primary_s_name_are_read_with_their_passwords(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every process takes the Sentinels in one place: the clients, Celery's broker and
    RedBeat all name the same Sentinels, primary, database and passwords."""
    from humanconnect import redis_clients
    from humanconnect.queue import celery_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.5:26379, sentinel-2:26380,")
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "hc-primary")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "s-pass")
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss/word")
    monkeypatch.setenv("REDIS_DB", "3")
    s = load()
    assert s.redis_configured and s.redis_url is None
    assert redis_clients.sentinel_addresses(s) == [("10.0.0.5", 26379), ("sentinel-2", 26380)]

    conf = celery_config(s)
    assert conf["broker_url"] == (
        "sentinel://:p%40ss%2Fword@10.0.0.5:26379/3;sentinel://:p%40ss%2Fword@sentinel-2:26380/3"
    )
    options = conf["broker_transport_options"]
    assert options["master_name"] == "hc-primary"
    assert options["sentinel_kwargs"]["password"] == "s-pass"
    assert conf["redbeat_redis_url"].startswith("redis-sentinel://")
    beat = conf["redbeat_redis_options"]
    assert (beat["service_name"], beat["password"], beat["db"]) == ("hc-primary", "p@ss/word", 3)
    assert beat["sentinels"] == [("10.0.0.5", 26379), ("sentinel-2", 26380)]

    client = redis_clients.client(s)
    pool = client.connection_pool
    assert pool.service_name == "hc-primary"  # type: ignore[attr-defined]
    assert pool.connection_kwargs["password"] == "p@ss/word"
    assert pool.connection_kwargs["db"] == 3


@pytest.mark.parametrize(
    "name",
    [
        "HUMANCONNECT_FINISHED_STATUS_TTL_S",
        "HUMANCONNECT_RETENTION_S",
        "HUMANCONNECT_RETENTION_INTERVAL_S",
    ],
)
@pytest.mark.parametrize("value", ["-1", "0", "thirty days", ""])
def test_a_bad_retention_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str
) -> None:
    """A negative, zero or non-numeric retention value is refused, naming the variable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{name}: ") as refused:
        load()
    assert "\n" not in str(refused.value)


def test_retention_settings_default_as_documented(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Unset: a finished record lasts an hour, retention 30 days, the job every hour."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "HUMANCONNECT_FINISHED_STATUS_TTL_S",
        "HUMANCONNECT_RETENTION_S",
        "HUMANCONNECT_RETENTION_INTERVAL_S",
    ):
        monkeypatch.delenv(name, raising=False)
    s = load()
    assert (s.finished_status_ttl_s, s.retention_s, s.retention_interval_s) == (3600, 2592000, 3600)


def test_a_process_with_a_bad_retention_setting_stops_at_start(tmp_path: Path) -> None:
    """A process reading its settings at start exits 2 with one line naming the variable."""
    env = {**os.environ, "HUMANCONNECT_RETENTION_S": "-5"}
    done = subprocess.run(
        [sys.executable, "-c", "from humanconnect.startup import settings_or_exit as s; s()"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("humanconnect: HUMANCONNECT_RETENTION_S: ")
