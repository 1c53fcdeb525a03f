"""A Redis that may evict keys would drop queued sessions silently: `web`, `worker` and
`beat` refuse to start against one, with one line naming the setting, unless the operator
allows it (then every start warns)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from humanconnect import redis_policy
from humanconnect.cli.procs import commands, free_port
from humanconnect.errors import ConfigError
from tests.support.env import (
    CLIENT_ID,
    CLIENT_SECRET,
    FERNET_KEY,
    ROOT,
    service_env,
)
from tests.support.servers import RedisServer

REFUSAL = (
    "humanconnect: Redis maxmemory-policy is allkeys-lru, which can evict queued sessions: "
    "set it to noeviction (or HUMANCONNECT_ALLOW_EVICTING_REDIS=1 to run anyway)"
)


@pytest.fixture
def lru_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path / "lru", extra=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]
    ).start()
    yield server
    server.stop()


def test_check_refuses_warns_or_passes(
    lru_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError) as refused:
        redis_policy.check(redis.Redis.from_url(lru_redis.url), allow=False)
    assert "humanconnect: " + str(refused.value) == REFUSAL
    with caplog.at_level(logging.WARNING, logger="humanconnect.redis_policy"):
        redis_policy.check(redis.Redis.from_url(lru_redis.url), allow=True)
    assert "maxmemory-policy is allkeys-lru" in caplog.text
    redis.Redis.from_url(lru_redis.url).config_set("maxmemory-policy", "noeviction")
    redis_policy.check(redis.Redis.from_url(lru_redis.url), allow=False)
    # Unreachable: the process's own handling of an absent Redis, not a refusal.
    redis_policy.check(redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), allow=False)


@pytest.mark.parametrize("process", ["web", "worker", "beat"])
def test_each_process_refuses_an_evicting_redis_with_one_line(
    process: str, lru_redis: RedisServer, tmp_path: Path
) -> None:
    env = service_env(
        REDIS_URL=lru_redis.url,
        DATABASE_URL=f"sqlite:///{tmp_path / 'hc.db'}",
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANAPI_CLIENT_SECRET=CLIENT_SECRET,
        HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY,
    )
    argv = commands(free_port(), tmp_path)[process]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert REFUSAL in lines, lines[-10:]
    assert "Traceback" not in done.stderr


def test_allowed_it_starts_and_says_so(lru_redis: RedisServer, tmp_path: Path) -> None:
    from tests.support.processes import start_web

    env = service_env(
        REDIS_URL=lru_redis.url,
        DATABASE_URL=f"sqlite:///{tmp_path / 'hc.db'}",
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY,
        HUMANCONNECT_ALLOW_EVICTING_REDIS="1",
    )
    web, _ = start_web(env, ROOT, tmp_path / "web.log")
    try:
        assert "maxmemory-policy is allkeys-lru" in web.output()
        assert "HUMANCONNECT_ALLOW_EVICTING_REDIS=1" in web.output()
    finally:
        web.stop()
