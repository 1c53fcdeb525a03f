"""Load shedding: with HUMANCONNECT_MAX_BACKLOG sessions queued, a new finish gets 503 with
Retry-After and nothing of it is written; a duplicate of an accepted one is still answered;
everything queued is stored once the worker drains. A real web and worker on real Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from humanconnect.crypto import session_hash
from humanconnect.redis_keys import PENDING, QUEUES, session_claim
from humanconnect.sandbox.standin import Running
from humanconnect.settings import Settings
from humanconnect.storage import migrate
from producer.app import create_app
from producer.memory import INTERVAL_S, MIN_HEADROOM_BYTES, MemoryWatch
from tests import factories
from tests.support.env import HANG_GUARD, ROOT, deployment_env, wait_for
from tests.support.processes import Deployment, start_web, start_worker
from tests.support.scan import state_counts, stored_users
from tests.support.servers import RedisServer, web_redis

CAP = 10


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cap_is_queued_the_rest_shed_and_everything_queued_stored(
    deploy: Callable[..., Deployment], redis_client: redis.Redis, db_url: str, tmp_path: Path
) -> None:
    d = deploy(HUMANCONNECT_MAX_BACKLOG=str(CAP))
    # No worker while the queue fills: the cap is exact, not a race with the drain (a paused
    # worker would still take one message through the BRPOP it left waiting).
    d.worker.stop()
    try:
        bodies = [factories.finish_body() for _ in range(3 * CAP)]
        answers = [httpx.post(d.url + "/connect/finish", json=b, timeout=10) for b in bodies]
        codes = [a.status_code for a in answers]
        assert codes.count(202) == CAP and codes.count(503) == 2 * CAP, codes
        assert codes[:CAP] == [202] * CAP
        shed = [a for a in answers if a.status_code == 503]
        assert all(a.headers["Retry-After"] for a in shed)
        assert shed[0].json()["error"] == "too many sessions queued, try again"
        # Nothing of a shed finish was written: no claim, no status, no pending entry.
        assert sum(redis_client.llen(q) for q in QUEUES) == CAP
        assert redis_client.zcard(PENDING) == CAP
        assert len(list(redis_client.scan_iter("hc:session:*"))) == CAP
        assert len(list(redis_client.scan_iter("hc:request:*"))) == CAP
        # A duplicate of an accepted session is answered as before, full or not.
        again = httpx.post(d.url + "/connect/finish", json=bodies[0], timeout=10)
        assert again.status_code == 202
        assert again.json()["requestId"] == answers[0].json()["requestId"]
        # The process is fine: ready, and the metric says why finishes were refused.
        assert httpx.get(d.url + "/readyz").status_code == 200
        metrics = httpx.get(d.url + "/metrics").text
        assert 'humanconnect_finishes_total{outcome="refused",reason="backlog_full"} 20.0' in (
            metrics
        )
    finally:
        worker = start_worker(d.env, ROOT, tmp_path / "worker2.log")
    try:
        wait_for(lambda: state_counts(db_url).get("succeeded") == CAP, 60, what="the cap stored")
        # Drained: finishes are taken again.
        assert httpx.post(d.url + "/connect/finish", json=bodies[-1]).status_code == 202
    finally:
        worker.stop()


def test_a_redis_out_of_memory_sheds_with_nothing_half_accepted_and_the_drain_goes_on(
    standin: Running, tmp_path: Path
) -> None:
    """A real Redis with noeviction and a small maxmemory: near full, finishes get 503 with
    nothing of them written (no claim, no status, no message); the workers, left the rest of
    the memory, drain everything accepted; with memory freed, finishes are taken again."""
    server = RedisServer(tmp_path / "redis", extra=["--maxmemory-policy", "noeviction"]).start()
    db_url = f"sqlite:///{tmp_path / 'hc.db'}"
    migrate.upgrade(db_url)
    env = deployment_env(server.url, db_url, standin.url, HUMANCONNECT_AUTO_MIGRATE="0")
    r = redis.Redis.from_url(server.url)
    web, url = start_web(env, ROOT, tmp_path / "web.log")
    worker = start_worker(env, ROOT, tmp_path / "worker.log")
    try:
        # The worker paused (its queues declared, its connections open) while Redis fills:
        # room for a few hundred sessions above what the running service already holds.
        worker.signal(signal.SIGSTOP)
        # Room for a few hundred sessions before the web's headroom for the workers (16 MiB,
        # producer/memory.py): most of the space above the headroom taken by a filler.
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used + MIN_HEADROOM_BYTES + 4_000_000)
        # Made by SETRANGE, not a 3 MB SET: the SET's value also sat in its connection's
        # query buffer, 3 MB more until Redis's client cron freed it, which left the web full
        # from its first finish whenever that cron came late (it visits a few clients a tick:
        # seen once the worker held a connection per thread, 16 more clients).
        r.setrange("filler", 3_000_000 - 1, b"x")
        bodies = [factories.finish_body() for _ in range(3000)]
        answers = []
        for body in bodies:
            answers.append(httpx.post(url + "/connect/finish", json=body, timeout=10))
            if answers[-1].status_code == 503 and len(answers) > 50:
                if sum(a.status_code == 503 for a in answers[-20:]) == 20:
                    break
        accepted = [b for b, a in zip(bodies, answers, strict=False) if a.status_code == 202]
        shed = [(b, a) for b, a in zip(bodies, answers, strict=False) if a.status_code == 503]
        assert len(accepted) > 50 and len(shed) >= 20, (len(accepted), len(shed))
        assert {a.status_code for a in answers} == {202, 503}
        assert all(a.headers["Retry-After"] for _, a in shed)
        assert shed[0][1].json()["error"] == "too many sessions queued, try again"
        # Nothing half-accepted: exactly the accepted sessions are claimed, recorded, queued.
        assert not any(r.exists(session_claim(session_hash(b["sessionToken"]))) for b, _ in shed)
        assert r.zcard(PENDING) == len(accepted)
        assert len(list(r.scan_iter("hc:request:*"))) == len(accepted)
        # Queued, but for the one the paused worker's waiting BRPOP took as it stopped.
        assert len(accepted) - 1 <= sum(r.llen(q) for q in QUEUES) <= len(accepted)
        assert httpx.get(url + "/readyz").status_code == 200
        assert 'reason="redis_oom"' in httpx.get(url + "/metrics").text
    finally:
        worker.signal(signal.SIGCONT)
    try:
        # The worker drains it all, at the same maxmemory.
        wait_for(
            lambda: state_counts(db_url).get("succeeded") == len(accepted),
            90,
            what="every accepted session stored",
        )
        stored = stored_users(db_url)
        assert {b["humanId"] for b in accepted} <= set(stored)
        # Memory freed (here, the filler: an operator raising maxmemory is the same), the web
        # takes finishes again at its next reading.
        r.delete("filler")
        wait_for(
            lambda: httpx.post(url + "/connect/finish", json=shed[0][0]).status_code == 202,
            10,
            what="finishes taken again",
        )
    finally:
        worker.stop()
        web.stop()
        server.stop()


def test_an_accept_refused_by_redis_oom_is_shed_too(
    make_settings: Callable[..., Settings], sqlite_url: str, tmp_path: Path
) -> None:
    """Past the web's reading (a burst between two), Redis itself refuses the accept script
    at its first write, after every check: the same 503, and nothing written."""
    server = RedisServer(tmp_path / "redis", extra=["--maxmemory-policy", "noeviction"]).start()
    try:
        # The app stopped while its Redis still runs (its shutdown talks to it).
        settings = make_settings(REDIS_URL=server.url, DATABASE_URL=sqlite_url)
        with TestClient(create_app(settings)) as client:
            # The web's own reading stopped: this is Redis's refusal alone.
            assert client.portal is not None
            client.portal.call(client.app.state.parts.memory.stop)  # type: ignore[attr-defined,call-arg]
            r = redis.Redis.from_url(server.url)
            r.config_set("maxmemory", 1)  # below what any Redis uses: every write refused
            answer = client.post("/connect/finish", json=factories.finish_body())
            assert answer.status_code == 503 and answer.headers["Retry-After"]
            assert answer.json()["error"] == "too many sessions queued, try again"
            r.config_set("maxmemory", 0)
            assert r.dbsize() == 0
            assert 'reason="redis_oom"' in client.get("/metrics").text
            r.close()
    finally:
        server.stop()


def test_the_memory_watch_stops_promptly_whenever_it_is_stopped(redis_url: str) -> None:
    """The web's shutdown stops the watch: a stop that lands while redis-py opens its
    connection (its cancel comes back as a RedisError) once hung the shutdown for good."""

    async def cycles() -> float:
        worst = 0.0
        for i in range(30):
            r = web_redis(redis_url)
            watch = MemoryWatch(r)
            await watch.start()
            await asyncio.sleep(i % 7 * 0.0005)  # caught at every point of its first reading
            started = time.monotonic()
            await watch.stop()
            worst = max(worst, time.monotonic() - started)
            await r.aclose()
        return worst

    # The stop's own bound is 2 intervals + 1 s; on a busy machine only a hang is told.
    worst = asyncio.run(cycles())
    assert worst < HANG_GUARD * (2 * INTERVAL_S + 1), worst
