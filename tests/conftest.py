"""Fixtures: real Redis, SQLite and PostgreSQL databases, the upstream stand-in, settings.

Helpers live in tests/support/; this file only wires them into fixtures. Every fixture that
touches the shared Redis goes through `redis_url`, which flushes it before and after the test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from humanconnect.cli.procs import stop_all
from humanconnect.cli.redis_group import RedisGroup
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Running
from humanconnect.settings import Settings
from humanconnect.storage import migrate
from humanconnect.storage.db import dispose_all
from tests import factories
from tests.support.env import (
    CLIENT_ID,
    CLIENT_SECRET,
    FERNET_KEY,
    NO_LIMITS,
    ROOT,
    deployment_env,
)
from tests.support.hooks import SCHEDULE, SECRET
from tests.support.otlp import OtlpReceiver
from tests.support.processes import Deployment, Process, start_web, start_worker
from tests.support.receiver import Receiver
from tests.support.servers import RedisServer, flushed, fresh_database, pg_or_skip


def _deployment(
    env: dict[str, str], db_url: str, logs: Path, started: list[Process], *, sandbox_web: bool
) -> Deployment:
    """`web` and `worker` on `env`, logging into `logs`; both added to `started` to stop."""
    web_env = {k: v for k, v in env.items() if k != "HUMANAPI_CLIENT_SECRET"}
    web, url = start_web(web_env if sandbox_web else env, ROOT, logs / "web.log")
    started.append(web)
    worker = start_worker(env, ROOT, logs / "worker.log", concurrency=32)
    started.append(worker)
    return Deployment(url, env, web, worker, db_url, [logs / "web.log", logs / "worker.log"])


@pytest.fixture
def deploy(
    redis_url: str, redis_client: redis.Redis, db_url: str, standin: Running, tmp_path: Path
) -> Iterator[Callable[..., Deployment]]:
    """Start `web` and `worker` as the Procfile does, with only the contract's variables."""
    started: list[Process] = []

    def make(*, sandbox_web: bool = False, **extra: str) -> Deployment:
        """`sandbox_web`: the web without the clientSecret, in sandbox mode as `up` runs it."""
        env = deployment_env(redis_url, db_url, standin.url, **extra)
        return _deployment(env, db_url, tmp_path, started, sandbox_web=sandbox_web)

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def module_deploy(
    module_redis_url: str, module_db_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Deployment]]:
    """`deploy` for a whole module (starting processes takes seconds), against the upstream
    the module gives, on `module_redis_url` and `module_db_url`."""
    started: list[Process] = []

    def make(upstream_url: str, *, sandbox_web: bool = False, **extra: str) -> Deployment:
        env = deployment_env(module_redis_url, module_db_url, upstream_url, **extra)
        logs = tmp_path_factory.mktemp("deploy-logs")
        return _deployment(env, module_db_url, logs, started, sandbox_web=sandbox_web)

    yield make
    stop_all(started)


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis for the whole run: the machine's (HUMANCONNECT_TEST_REDIS_URL) or one we
    start. Tests take `redis_url` instead, which flushes it."""
    given = os.environ.get("HUMANCONNECT_TEST_REDIS_URL")
    if given:
        yield given
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """The shared Redis's URL, its database flushed before and after the test."""
    with flushed(redis_server_url) as url:
        yield url


@pytest.fixture(scope="module")
def module_redis_url(redis_server_url: str) -> Iterator[str]:
    """The shared Redis, flushed before and after the module (as `redis_url` is per test)."""
    with flushed(redis_server_url) as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the shared Redis (flushed by `redis_url`)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own, which it may kill and restart."""
    server = RedisServer(tmp_path / "own-redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_group(tmp_path: Path) -> Iterator[RedisGroup]:
    """A Sentinel group of this test's own (a primary, two replicas, three Sentinels), ready
    to fail over; stopped afterwards, frozen nodes too."""
    group = RedisGroup(tmp_path / "redis-group")
    try:
        yield group.start()
    finally:
        group.stop()


#: Every database the service runs on: SQLite, then PostgreSQL (skipped locally without one).
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated database: a SQLite file, then a fresh PostgreSQL database."""
    base = "" if request.param == "sqlite" else pg_or_skip()
    with fresh_database(request.param, tmp_path, base) as url:
        yield url


@pytest.fixture(scope="module", params=DATABASES)
def module_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`db_url` for a whole module: one empty, migrated database the module's tests share."""
    base = "" if request.param == "sqlite" else pg_or_skip()
    with fresh_database(request.param, tmp_path_factory.mktemp("db"), base) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """An empty, migrated SQLite database only."""
    url = f"sqlite:///{tmp_path / 'hc.db'}"
    migrate.upgrade(url)
    yield url
    dispose_all()


@pytest.fixture
def standin() -> Iterator[Running]:
    """The upstream stand-in listening on a port, with this app's credentials."""
    running = Running(factories.standin()).start()
    yield running
    running.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver listening on a port, answering 200 until the test says otherwise."""
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP trace receiver listening on a port, collecting every exported span."""
    running = OtlpReceiver().start()
    yield running
    running.stop()


@pytest.fixture
def hooked(make_settings: Callable[..., Settings], db_url: str, receiver: Receiver) -> Runtime:
    """A runtime whose events go to `receiver`, three attempts with no wait between them. A
    5 s timeout: a receiver in this process answers in milliseconds when the machine is quiet,
    and may take a good part of a second when it is not (the hang test sets its own)."""
    return Runtime(
        make_settings(
            DATABASE_URL=db_url,
            HUMANCONNECT_WEBHOOK_URLS=receiver.url,
            HUMANCONNECT_WEBHOOK_SECRET=SECRET,
            HUMANCONNECT_WEBHOOK_TIMEOUT_S="5",
            HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE=SCHEDULE,
        )
    )


@pytest.fixture
def make_settings(redis_url: str) -> Callable[..., Settings]:
    """Settings for tests: the given variables, nothing from the developer's environment."""

    def make(**env: str) -> Settings:
        values = {
            "HUMANAPI_CLIENT_ID": CLIENT_ID,
            "HUMANAPI_CLIENT_SECRET": CLIENT_SECRET,
            "REDIS_URL": redis_url,
            "HUMANCONNECT_ENCRYPTION_KEYS": FERNET_KEY,
            "HUMANAPI_MAX_RPS": "1000",
            "HUMANCONNECT_RETRY_INITIAL_S": "0.01",
            "HUMANCONNECT_RETRY_INLINE_BUDGET_S": "0.2",
            "HUMANCONNECT_AUTO_MIGRATE": "0",
            **NO_LIMITS,
            **env,
        }
        # model_validate skips the environment and .env: the test decides everything.
        return Settings.model_validate(values)

    return make


@pytest.fixture
def make_client(
    make_settings: Callable[..., Settings], sqlite_url: str, redis_client: redis.Redis
) -> Iterator[Callable[..., TestClient]]:
    """The producer app in process with the given variables, on the shared Redis and a fresh
    SQLite file; closed after the test."""
    from producer.app import create_app

    opened: list[TestClient] = []

    def make(**env: str) -> TestClient:
        c = TestClient(create_app(make_settings(DATABASE_URL=sqlite_url, **env)))
        opened.append(c.__enter__())
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """The producer app in process, on the shared Redis and a fresh SQLite file."""
    return make_client()


@pytest.fixture
def runtime(make_settings: Callable[..., Settings], db_url: str, standin: Running) -> Runtime:
    """A runtime on the shared Redis, a fresh database and the stand-in."""
    return Runtime(
        make_settings(
            DATABASE_URL=db_url, HUMANAPI_BASE_URL=standin.url, HUMANAPI_AUTH_URL=standin.url
        )
    )
