"""Several beats: each periodic job is sent once per interval however many run, another beat
takes over when the sender dies, and a Redis outage ends none of them. Real `beat` processes
from the Procfile on a Redis of the test's own; no worker runs, so every webhook tick (one a
second for the one configured endpoint) stays on its queue, where the test counts them."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from celery import Celery
from redbeat.decoder import RedBeatJSONEncoder

from humanconnect.cli.procs import commands
from humanconnect.queue import BEAT_KEY_PREFIX, BEAT_LOCK_TIMEOUT_S, BEAT_MAX_LOOP_S
from humanconnect.redis_keys import WEBHOOK_QUEUE
from humanconnect.settings import Settings
from humanconnect.webhooks import signing
from humanconnect.webhooks.deliveries import endpoint_digest
from tests.support.env import (
    CLIENT_ID,
    FERNET_KEY,
    HANG_GUARD,
    ROOT,
    service_env,
    timed,
    wait_for,
)
from tests.support.processes import Process
from tests.support.servers import RedisServer
from worker.beat import Scheduler
from worker.celery import configure

log = logging.getLogger(__name__)
SECRET = signing.new_secret()
ENDPOINT = "http://127.0.0.1:9/"
ACQUIRED = "beat: Acquired lock"
UNREACHABLE = "beat: Redis unreachable"
LOCK_KEY = BEAT_KEY_PREFIX + ":lock"
#: Ticks each count waits for: the tick is 1 s, so a sender takes about this many seconds.
TICKS = 6


@pytest.fixture
def start_beat(own_redis: RedisServer, tmp_path: Path) -> Iterator[Callable[[str], Process]]:
    """Start a `beat` from the Procfile on `own_redis`, with one webhook endpoint."""
    env = service_env(
        REDIS_URL=own_redis.url,
        DATABASE_URL=f"sqlite:///{tmp_path / 'hc.db'}",
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY,
        HUMANCONNECT_WEBHOOK_URLS=ENDPOINT,
        HUMANCONNECT_WEBHOOK_SECRET=SECRET,
    )
    started: list[Process] = []

    def start(name: str) -> Process:
        beat = Process(name, commands(0, tmp_path)["beat"], env, ROOT, tmp_path / f"{name}.log")
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.stop()


def ticks(r: redis.Redis) -> int:
    return int(r.llen(WEBHOOK_QUEUE))


def watch(r: redis.Redis, n: int) -> tuple[int, float, set[str]]:
    """Wait for `n` more ticks: how many came, the seconds they took, and which processes
    queued them (each message's `origin`, gen<pid>@host)."""
    before = ticks(r)
    _, took = timed(
        lambda: wait_for(lambda: ticks(r) >= before + n, HANG_GUARD * n, what=f"{n} ticks")
    )
    queued = r.lrange(WEBHOOK_QUEUE, 0, -1)  # newest first
    new = queued[: len(queued) - before]
    return len(new), took, {json.loads(m)["headers"]["origin"].split("@")[0] for m in new}


def assert_one_sender(watched: tuple[int, float, set[str]], sender: Process, what: str) -> None:
    queued, took, origins = watched
    # Every tick from the one beat holding the lock...
    assert origins == {f"gen{sender.proc.pid}"}, (origins, what)
    # ...and each once: a beat that runs late sends late, never twice, so the ticks are no
    # more than the seconds they took (two senders would queue twice as many).
    assert queued <= took + 2, f"{queued} ticks in {took:.1f} s {what}"


def test_two_beats_send_each_tick_once_and_the_survivor_takes_over(
    start_beat: Callable[[str], Process], own_redis: RedisServer
) -> None:
    """Two beats queue one tick a second, not two; with the sender SIGKILLed the other sends
    within the lock's timeout, still once a second."""
    r = redis.Redis.from_url(own_redis.url)
    # Given two beats, one of which holds the lock and sends
    beats = [start_beat("beat-a"), start_beat("beat-b")]
    wait_for(lambda: ticks(r) >= 2, 30, what="ticks to be queued")
    assert all(b.alive() for b in beats), [b.output()[-2000:] for b in beats]
    holders = [b for b in beats if ACQUIRED in b.output()]
    assert len(holders) == 1, [b.output()[-2000:] for b in beats]
    (sender,) = holders
    (standby,) = [b for b in beats if b is not sender]
    # Then each tick is queued once
    assert_one_sender(watch(r, TICKS), sender, "with two beats running")

    # When the sender is SIGKILLed (its lock left to expire)
    sender.signal(signal.SIGKILL)
    sender.proc.wait(10)
    lock_left_s = max(0, int(r.pttl(LOCK_KEY))) / 1000
    before = ticks(r)
    _, takeover_s = timed(
        lambda: wait_for(
            lambda: ticks(r) > before,
            HANG_GUARD * (BEAT_LOCK_TIMEOUT_S + BEAT_MAX_LOOP_S),
            what="the standby to send",
        )
    )
    log.info("the standby sent %.2f s after the sender's SIGKILL", takeover_s)
    # Then the standby took the lock once it expired, not before, and sends, still once a
    # second (how late it came after the expiry is the machine's load, not asserted)
    assert ACQUIRED in standby.output() and standby.alive()
    assert takeover_s >= lock_left_s - 0.05, (takeover_s, lock_left_s)
    assert_one_sender(watch(r, TICKS), standby, "after the takeover")


def test_a_beat_waits_for_redis_and_outlives_a_restart_that_lost_everything(
    start_beat: Callable[[str], Process], own_redis: RedisServer
) -> None:
    """A beat started before Redis sends once Redis is up; Redis killed and restarted empty
    (no AOF here), it logs the outage, takes the lock again, writes the schedule again and
    goes on ticking. It never exits on its own."""
    r = redis.Redis.from_url(own_redis.url)
    # Given a beat started while Redis is down
    own_redis.kill()
    beat = start_beat("beat")

    def outages() -> int:
        return beat.output().count(UNREACHABLE)

    wait_for(lambda: beat.alive() and outages() >= 1, 60, what="the beat to meet the outage")
    own_redis.start()
    # Then it sends once Redis is up
    wait_for(lambda: ticks(r) >= 2, 30, what="ticks to be queued")
    # When Redis dies, and comes back without the lock or the schedule
    seen = outages()
    own_redis.kill()
    wait_for(lambda: outages() > seen, 60, what="the beat to meet the second outage")
    own_redis.start()
    # Then the same beat sends again
    wait_for(lambda: ticks(r) >= 3, 15, what="ticks after the restart")
    out = beat.output()
    assert beat.alive(), out[-3000:]
    assert UNREACHABLE in out and "beat raised exception" not in out, out[-3000:]


def test_an_entry_gone_from_the_settings_is_gone_from_redis(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """A beat started without a webhook endpoint deletes, once it holds the lock, the entry an
    earlier beat stored for it: a removed endpoint stops ticking. The others keep their last
    run. A standby (no lock) writes nothing: the sender's schedule is the sender's."""

    def start_scheduler(*urls: str, lead: bool = True) -> None:
        app = Celery("beats-test")
        settings = make_settings(
            HUMANCONNECT_WEBHOOK_URLS=",".join(urls), HUMANCONNECT_WEBHOOK_SECRET=SECRET
        )
        configure(app, settings)
        scheduler = Scheduler(app=app)
        if lead:
            # Its first pass, holding the lock, writes the schedule (and sends what is due).
            scheduler.tick()
            scheduler.close()
            app.redbeat_redis.close()

    kept, removed = "http://127.0.0.1:9/kept", "http://127.0.0.1:9/removed"
    schedule = BEAT_KEY_PREFIX + ":schedule"

    def entry(url: str) -> str:
        return f"{BEAT_KEY_PREFIX}deliver-webhooks-{endpoint_digest(url)}"

    # Given a beat that ran with two endpoints
    start_scheduler(kept, removed)
    assert redis_client.exists(entry(kept), entry(removed)) == 2
    relay = BEAT_KEY_PREFIX + "relay-events"
    last_run = json.dumps({"last_run_at": datetime(2030, 1, 2, tzinfo=UTC)}, cls=RedBeatJSONEncoder)
    redis_client.hset(relay, "meta", last_run)
    # When a standby starts with one, nothing changes
    start_scheduler(kept, lead=False)
    assert redis_client.exists(entry(kept), entry(removed)) == 2
    # When a beat that takes the lock starts with one
    start_scheduler(kept)
    # Then the other's entry is gone, and what stayed keeps its state
    assert redis_client.exists(entry(kept)) and not redis_client.exists(entry(removed))
    assert redis_client.zscore(schedule, entry(removed)) is None
    assert redis_client.zscore(schedule, entry(kept)) is not None
    assert redis_client.hget(relay, "meta") == last_run.encode()
