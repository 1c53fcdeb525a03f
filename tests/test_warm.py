"""A burst on an idle service is fast from its first finish: the web opens its Redis
connections and loads the accept script before it serves, keeps them open through a Redis
that drops idle clients or restarts, and has done each route's first-call work; a niced
worker that leads its own session nices its scheduling group too. Real Redis servers."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
import redis
from fastapi.testclient import TestClient

from humanconnect.cli.procs import free_port
from humanconnect.settings import Settings
from producer import warm
from producer.app import create_app
from producer.claims import _ACCEPT
from producer.warm import CONNECTIONS, WarmPool
from tests import factories
from tests.support.env import HANG_GUARD, ROOT, wait_until
from tests.support.servers import RedisServer, web_redis
from worker import priority


def _clients(r: redis.Redis) -> int:
    """Clients connected to `r`'s server other than `r`'s own connection."""
    me = str(r.client_id())
    return sum(1 for c in r.client_list() if c["id"] != me)


#: The accept script's digest, as Redis names it.
ACCEPT_SHA = hashlib.sha1(_ACCEPT.encode()).hexdigest()


def test_the_web_is_warm_before_it_serves(
    make_settings: Callable[..., Settings],
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before its first request: its connections open, the accept script in Redis, and no
    route left to read its own source on its first call (FastAPI does, for its error
    messages: 6 ms of the finish route's first request)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        settings = make_settings(REDIS_URL=server.url, DATABASE_URL=sqlite_url)
        assert r.script_exists(ACCEPT_SHA) == [False]
        with TestClient(create_app(settings)) as client:
            assert _clients(r) >= CONNECTIONS
            assert r.script_exists(ACCEPT_SHA) == [True]
            read: list[Any] = []
            real = inspect.getsourcelines

            def counted(f: Any) -> Any:
                read.append(f)
                return real(f)

            monkeypatch.setattr(inspect, "getsourcelines", counted)
            for path in ("/healthz", "/readyz"):
                assert client.get(path).status_code == 200
            answer = client.post("/connect/finish", json=factories.finish_body())
            assert answer.status_code == 202
            assert read == []
    finally:
        server.stop()


def test_prime_reaches_every_route_through_the_fastapi_internals_it_uses(
    make_settings: Callable[..., Settings], sqlite_url: str
) -> None:
    """The private FastAPI parts `prime` leans on are still there: the per-endpoint cache
    it fills, and the included routers it walks into (every documented operation found).
    A FastAPI upgrade that drops either fails here, not quietly in a slower first request."""
    api = create_app(make_settings(DATABASE_URL=sqlite_url))
    assert callable(getattr(fastapi.routing, "_extract_endpoint_context", None))
    found = {(m, route.path) for route in warm._routes(api.routes) for m in route.methods or ()}
    documented = {(m.upper(), p) for p, ops in api.openapi()["paths"].items() for m in ops}
    assert documented and documented <= found


def _run_against(
    server: RedisServer, body: Callable[[redis.Redis, str], Coroutine[Any, Any, None]]
) -> None:
    """Run `body` on a new loop, given a client of `server` and its URL."""
    r = redis.Redis.from_url(server.url)
    try:
        asyncio.run(body(r, server.url))
    finally:
        r.close()


async def _reopened(r: redis.Redis) -> None:
    """Wait until the keeper holds CONNECTIONS again (at most 5 s)."""
    deadline = time.monotonic() + 5
    while _clients(r) < CONNECTIONS and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _clients(r) >= CONNECTIONS


def test_the_keeper_reopens_what_redis_closed_and_reloads_the_script(
    own_redis: RedisServer,
) -> None:
    """A Redis that closes idle clients (its `timeout`), or restarts, costs the keeper a
    reconnect, not the next burst."""

    async def run(r: redis.Redis, url: str) -> None:
        aredis = web_redis(url)
        keeper = WarmPool(aredis, prepare=lambda: aredis.script_load(_ACCEPT), interval_s=0.2)
        try:
            await keeper.start()
            assert await keeper.touch() == CONNECTIONS
            r.script_flush()
            assert r.client_kill_filter(_type="normal", skipme=True) >= CONNECTIONS
            await asyncio.sleep(0.1)
            assert _clients(r) == 0
            await _reopened(r)
            # Loaded after the round gives its connections back: wait for that, not just them.
            await wait_until(
                lambda: r.script_exists(ACCEPT_SHA) == [True], HANG_GUARD, what="the script"
            )
        finally:
            await keeper.stop()
            await aredis.aclose()

    _run_against(own_redis, run)


def test_the_keeper_leaves_a_busy_web_alone_and_touches_it_once_quiet(
    own_redis: RedisServer,
) -> None:
    """A round takes every connection it keeps at once: amid a burst it would hold the
    finishes up, and the burst keeps its connections in use anyway. So rounds wait for a
    quiet moment, and skip while there is none."""
    busy = True

    async def run(r: redis.Redis, url: str) -> None:
        nonlocal busy
        aredis = web_redis(url)
        keeper = WarmPool(
            aredis, interval_s=0.2, last_use=lambda: time.monotonic() if busy else 0.0
        )
        try:
            await keeper.start()
            assert r.client_kill_filter(_type="normal", skipme=True) >= CONNECTIONS
            await wait_until(lambda: keeper.skipped >= 2, 30, what="rounds skipped")
            assert _clients(r) == 0
            busy = False
            await _reopened(r)
        finally:
            await keeper.stop()
            await aredis.aclose()

    _run_against(own_redis, run)


def test_a_keeper_kept_busy_still_touches_its_connections_now_and_then(
    own_redis: RedisServer,
) -> None:
    """Steady traffic uses only the few connections it needs at once: the rest would outlive
    a Redis `timeout` unused, so a round too long skipped is forced."""

    async def run(r: redis.Redis, url: str) -> None:
        aredis = web_redis(url)
        keeper = WarmPool(aredis, interval_s=0.2, last_use=time.monotonic, force_after_s=1.0)
        try:
            await keeper.start()
            assert r.client_kill_filter(_type="normal", skipme=True) >= CONNECTIONS
            await _reopened(r)
            assert keeper.skipped >= 2
        finally:
            await keeper.stop()
            await aredis.aclose()

    _run_against(own_redis, run)


def test_a_held_up_loop_is_not_taken_for_a_quiet_moment() -> None:
    """While the loop is held up, finishes queue unread: the moment after is the busiest,
    whatever the last accept's time says."""

    async def run() -> tuple[bool, bool]:
        keeper = WarmPool(web_redis("redis://127.0.0.1:1/0"), last_use=lambda: 0.0, quiet_s=0.2)
        quiet = await keeper._quiet()
        held = asyncio.create_task(keeper._quiet())
        await asyncio.sleep(0)  # it sleeps now
        time.sleep(1.0)  # the loop held up, as by a long request
        return quiet, await held

    assert asyncio.run(run()) == (True, False)


def test_a_web_starts_and_stops_promptly_with_redis_away() -> None:
    """No Redis at start: the warm-up gives up within its connect timeouts (the web then
    answers 503 until Redis is back, and the keeper opens the connections then)."""

    async def run() -> tuple[float, float]:
        aredis = web_redis(f"redis://127.0.0.1:{free_port()}/0")
        keeper = WarmPool(aredis, interval_s=0.1)
        started = time.monotonic()
        await keeper.start()
        took = time.monotonic() - started
        await asyncio.sleep(0.3)  # a few rounds of the keeper, each failing
        started = time.monotonic()
        await keeper.stop()
        await aredis.aclose()
        return took, time.monotonic() - started

    # Refused connections give up at once; the bounds only tell a hang (10x the 3 s once
    # asserted), not this machine's speed.
    start_s, stop_s = asyncio.run(run())
    assert start_s < HANG_GUARD * 3 and stop_s < HANG_GUARD * 3, (start_s, stop_s)


PROBE = (
    "from worker.priority import autogroup_niceness, nice_session_group; "
    "print(nice_session_group()); print(autogroup_niceness())"
)


@pytest.mark.skipif(
    priority.autogroup_niceness() is None,
    reason="this process is not scheduled by a Linux autogroup here (none, or a cgroup's)",
)
@pytest.mark.parametrize(
    ("own_session", "niceness", "expected"),
    [(True, 10, ("True", "10")), (False, 10, ("False", None)), (True, 0, ("False", "0"))],
)
def test_a_niced_worker_nices_its_own_session_group_only(
    own_session: bool, niceness: int, expected: tuple[str, str | None]
) -> None:
    """With autogroup scheduling, `nice -n 10` alone ranks the worker's threads only among
    themselves; a worker leading its own session gives its group the niceness too. One that
    shares a session (with a web, perhaps) leaves the group alone."""
    ours = str(priority.autogroup_niceness())
    out = subprocess.run(
        ["nice", "-n", str(niceness), sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=own_session,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert (out[0], out[1]) == (expected[0], expected[1] or ours)
    assert str(priority.autogroup_niceness()) == ours


@pytest.mark.parametrize(
    ("content", "written"), [("/autogroup-85 nice 0\n", "10"), ("", None), (None, None)]
)
def test_the_group_is_niced_only_where_an_autogroup_schedules_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, written: str | None
) -> None:
    """CI's runner puts its processes in a cgroup of their own: `/proc/self/autogroup` is
    there but empty, and a missing file means no autogroup at all. Neither is written to."""
    group = tmp_path / "autogroup"
    if content is not None:
        group.write_text(content)
    monkeypatch.setattr(priority, "AUTOGROUP", group)
    monkeypatch.setattr(priority.os, "nice", lambda _inc: 10)
    monkeypatch.setattr(priority.os, "getsid", lambda _pid: os.getpid())

    assert priority.nice_session_group() is (written is not None)
    if written is not None:
        assert group.read_text() == written
    else:
        assert not group.exists() or group.read_text() == content
