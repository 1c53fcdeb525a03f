"""Redis through Sentinels, as a process meets it at start: a configuration it refuses in
one line, and Sentinels it can't reach, which are an outage it reports, never a hang.
(Failovers themselves: tests/chaos/test_redis_failover.py.)"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis as AsyncRedis

from humanconnect import events
from humanconnect.cli.procs import BIN, commands, free_port, wait_ready
from humanconnect.cli.redis_group import RedisGroup
from humanconnect.crypto import Cipher
from humanconnect.queue import sender
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings
from producer.accept import Acceptor
from producer.body import FinishBody
from producer.claims import Claims
from producer.errors import NotReplicatedError
from producer.lanes import WaitingLane
from producer.message import MessageBuilder
from tests import factories
from tests.support.env import (
    CLIENT_ID,
    CLIENT_SECRET,
    FERNET_KEY,
    HANG_GUARD,
    ROOT,
    service_env,
    timed,
    wait_for,
)
from tests.support.processes import Process, start_web
from tests.support.scan import stream_entries


def _env(tmp_path: Path, **redis: str) -> dict[str, str]:
    return service_env(
        DATABASE_URL=f"sqlite:///{tmp_path / 'hc.db'}",
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANAPI_CLIENT_SECRET=CLIENT_SECRET,
        HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY,
        **redis,
    )


@pytest.mark.parametrize("process", ["web", "worker", "beat", "a command"])
def test_both_redis_url_and_sentinels_stop_every_process_naming_them(
    tmp_path: Path, process: str
) -> None:
    """Set REDIS_URL or REDIS_SENTINELS, not both: every process stops at start with one
    line that names them, exit status 2."""
    env = _env(
        tmp_path,
        REDIS_URL="redis://127.0.0.1:6379/0",
        REDIS_SENTINELS="127.0.0.1:26379",
        REDIS_SENTINEL_MASTER="hc-primary",
    )
    argv = (
        [str(BIN / "humanconnect"), "failed"]
        if process == "a command"
        else commands(free_port(), tmp_path)[process]
    )
    done = subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD * 6
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["humanconnect: set REDIS_URL or REDIS_SENTINELS, not both"], lines


def test_sentinels_out_of_reach_are_503s_and_a_worker_that_says_why(tmp_path: Path) -> None:
    """Sentinels nobody answers at: the web starts and refuses finishes with a quick 503
    (its readiness says Redis is not there), and the worker keeps trying, naming the
    Sentinels and the primary it can't find, instead of hanging or dying."""
    sentinels = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    env = _env(tmp_path, REDIS_SENTINELS=sentinels, REDIS_SENTINEL_MASTER="hc-primary")
    worker_log = tmp_path / "worker.log"
    worker = Process("worker", commands(0, tmp_path)["worker"], env, ROOT, worker_log)
    web, url = start_web(env, ROOT, tmp_path / "web.log")
    try:
        resp, took = timed(
            lambda: httpx.post(url + "/connect/finish", json=factories.finish_body(), timeout=30)
        )
        assert resp.status_code == 503 and resp.headers["Retry-After"], resp.text
        assert took < HANG_GUARD * 2, f"hung: {took:.1f} s"
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"

        def said_why() -> bool:
            text = worker.output()
            return "Cannot connect to sentinel://" in text and "No master found" in text

        assert wait_ready(said_why, [worker], HANG_GUARD * 6), worker.output()[-3000:]
        assert worker.alive()
    finally:
        web.stop()
        worker.stop()


@pytest.mark.slow
def test_a_duplicate_is_answered_only_once_the_replicas_hold_its_claim(
    redis_group: RedisGroup,
) -> None:
    """A resend answered from a claim another connection wrote (another web host's) waits
    for the replicas to hold that claim. (Redis documents WAIT as counting the connection's
    own writes, hence the mark the answer writes first: producer/claims.py.)"""
    primary = f"redis://127.0.0.1:{redis_group.primary().port}/0"

    async def run() -> tuple[bool, bool]:
        # One connection each: the host that accepts, and the host that answers the resend.
        hosts = [AsyncRedis.from_url(primary, single_connection_client=True) for _ in "ab"]
        app = sender(Settings.model_validate({"REDIS_URL": primary}), "test-replicas")
        accept, answer = (
            Acceptor(
                Claims(r, 60, WaitingLane.for_rate(20), replica_wait=(2, 200)),
                MessageBuilder(app),
                Cipher([FERNET_KEY]),
            )
            for r in hosts
        )
        # The answering host's own last write is on both replicas.
        await answer.accept(FinishBody(**factories.finish_body()))
        body = FinishBody(**factories.finish_body())
        replica = redis_group.replicas_now()[0]
        redis_group.freeze(replica)
        try:
            refused = []
            for acceptor in (accept, answer):
                try:
                    await acceptor.accept(body)
                    refused.append(False)
                except NotReplicatedError:
                    refused.append(True)
        finally:
            redis_group.thaw(replica)
        for r in hosts:
            await r.aclose()
        return refused[0], refused[1]

    accepted_unreplicated, answered_unreplicated = asyncio.run(run())
    assert accepted_unreplicated, "the accept itself was answered with one replica frozen"
    assert answered_unreplicated, "the resend was answered before both replicas held the claim"


@pytest.mark.slow
def test_an_event_counts_as_relayed_only_once_the_replicas_hold_it(
    redis_group: RedisGroup, make_settings: Callable[..., Settings], sqlite_url: str
) -> None:
    """With a replica required, an event whose stream entry no replica confirms stays
    unsent in the outbox (a failover then could take the entry away); sweeps add nothing
    while no replica keeps up; the first sweep after they do sends it again, with its
    eventId, and only then is it marked sent."""
    rt = Runtime(
        make_settings(
            REDIS_URL="",
            REDIS_SENTINELS=redis_group.sentinels_env,
            REDIS_SENTINEL_MASTER=redis_group.master_name,
            HUMANCONNECT_REDIS_MIN_REPLICAS="1",
            HUMANCONNECT_REDIS_REPLICA_TIMEOUT_MS="200",
            DATABASE_URL=sqlite_url,
        )
    )
    stream = rt.settings.events_stream
    with rt.db() as db:
        events.record(db, "connect.completed", humanId="h1", clientUserId="u1", requestId="r1")
        db.commit()
    replicas = redis_group.replicas_now()
    for replica in replicas:
        redis_group.freeze(replica)
    try:
        with rt.db() as db:
            assert (
                events.relay_pending(db, rt.redis, stream, grace_s=0, wait=rt.settings.replica_wait)
                == 0
            )
            assert events.backlog(db) == 1
            assert rt.redis.xlen(stream) == 1  # added, but unconfirmed
            # Once the frozen replicas' acknowledgements are seen to stop, the sweep adds
            # nothing more to the stream until they keep up again
            wait_for(
                lambda: events.replicas_keeping_up(rt.redis) == 0,
                HANG_GUARD,
                what="the replicas' acks to stop",
            )
            for _ in range(3):
                assert (
                    events.relay_pending(
                        db, rt.redis, stream, grace_s=0, wait=rt.settings.replica_wait
                    )
                    == 0
                )
            assert rt.redis.xlen(stream) == 1
            assert events.backlog(db) == 1
    finally:
        for replica in replicas:
            redis_group.thaw(replica)
    wait_for(lambda: len(redis_group.replicas_now()) == 2, HANG_GUARD * 3, what="replicas")
    wait_for(lambda: events.replicas_keeping_up(rt.redis) == 2, HANG_GUARD, what="acks")
    with rt.db() as db:
        assert (
            events.relay_pending(db, rt.redis, stream, grace_s=0, wait=rt.settings.replica_wait)
            == 1
        )
        assert events.backlog(db) == 0
    # The unconfirmed entry and its resend: one event, sent twice with its eventId.
    entries = stream_entries(rt.redis, stream)
    assert len(entries) == 2 and len({e["eventId"] for e in entries}) == 1
