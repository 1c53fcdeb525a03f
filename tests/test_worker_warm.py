"""A worker warms up once ready, before there is anything to drain (worker/warm.py): a real
worker process against its own Redis server."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from kombu.utils.imports import symbol_by_name

from humanconnect.cli.procs import free_port
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings
from tests.support.env import ROOT, deployment_env
from tests.support.processes import start_worker
from tests.support.servers import RedisServer
from worker import tasks, warm
from worker.warm import SCRIPTS

THREADS = 8


def test_a_ready_worker_holds_a_connection_per_thread_and_its_scripts(
    tmp_path: Path, sqlite_url: str, own_redis: RedisServer
) -> None:
    """Before any task ran, a ready worker has its scripts loaded and a connection open for
    each of its threads (its `--concurrency`, not the setting's 32)."""
    r = redis.Redis.from_url(own_redis.url)
    worker = None
    try:
        env = deployment_env(own_redis.url, sqlite_url, f"http://127.0.0.1:{free_port()}")
        worker = start_worker(env, ROOT, tmp_path / "worker.log", concurrency=THREADS)
        shas = [hashlib.sha1(s.encode()).hexdigest() for s in SCRIPTS]
        assert r.script_exists(*shas) == [True] * len(SCRIPTS)
        # Besides Celery's own few (5 here): one for each of its threads, before any task ran.
        assert THREADS + 2 <= len(r.client_list()) - 1 < 2 * THREADS
    finally:
        if worker is not None:
            worker.stop()
        r.close()


def test_the_warm_up_gives_way_when_redis_and_the_database_are_away(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker may start before its Redis or database: the tasks open what they need later."""
    settings = make_settings(
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none",
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.warm"):
        warm.prepare(Runtime(settings), THREADS)
    assert time.monotonic() - started < 10
    assert [m.getMessage() for m in caplog.records] == [
        "worker warm-up: redis not ready (ConnectionError)",
        "worker warm-up: database not ready (OperationalError)",
    ]


@pytest.mark.parametrize(
    ("pool", "warmed"),
    [("celery.concurrency.thread:TaskPool", True), ("celery.concurrency.prefork:TaskPool", False)],
)
def test_only_a_thread_pool_worker_warms_up(
    monkeypatch: pytest.MonkeyPatch, pool: str, warmed: bool
) -> None:
    """Under prefork the ready signal comes to the parent, which runs no task: connections
    opened there would only be held, and inherited by every child forked later."""
    calls: list[int] = []
    monkeypatch.setattr(warm, "prepare", lambda _rt, n: calls.append(n))
    monkeypatch.setattr(tasks, "runtime", lambda: None)
    monkeypatch.setattr(tasks, "exchanger", lambda: None)
    monkeypatch.setattr(tasks, "limiter", lambda: None)
    controller = SimpleNamespace(pool_cls=symbol_by_name(pool), concurrency=THREADS)
    tasks._on_worker_ready(sender=SimpleNamespace(controller=controller))
    assert calls == ([THREADS] if warmed else [])


def test_a_ready_worker_sizes_the_batch_call_pool_by_its_own_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--concurrency` overrides HUMANCONNECT_WORKER_CONCURRENCY: the pool a batch's calls
    run on is as large as the worker's own thread pool, not the setting."""
    settings = Settings.model_validate({"HUMANCONNECT_WORKER_CONCURRENCY": "32"})
    monkeypatch.setattr(warm, "prepare", lambda _rt, _n: None)
    monkeypatch.setattr(tasks, "runtime", lambda: SimpleNamespace(settings=settings))
    monkeypatch.setattr(tasks, "exchanger", lambda: None)
    monkeypatch.setattr(tasks, "limiter", lambda: None)
    monkeypatch.setattr(tasks, "_threads", [])
    tasks.calls.cache_clear()
    try:
        assert tasks.calls()._max_workers == 32 != THREADS
        pool = symbol_by_name("celery.concurrency.thread:TaskPool")
        controller = SimpleNamespace(pool_cls=pool, concurrency=THREADS)
        tasks._on_worker_ready(sender=SimpleNamespace(controller=controller))
        assert tasks.calls()._max_workers == THREADS
    finally:
        tasks.calls().shutdown(wait=False)
        tasks.calls.cache_clear()
