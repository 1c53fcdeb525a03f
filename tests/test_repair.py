"""The publicToken repair against a real Redis, a real database and the stand-in."""

from __future__ import annotations

import threading
from unittest import mock

import pytest
from redis.lock import Lock
from sqlalchemy import func, select

from humanconnect.clock import now_us
from humanconnect.jobs import repair
from humanconnect.jobs.repair import LOCK_KEY, Repairer
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.settings import Settings
from humanconnect.storage import tokens
from humanconnect.storage.models import User
from tests import factories
from tests.support.env import BIN, ROOT, wait_for
from tests.support.processes import Deployment, start_worker
from tests.support.scan import stream_entries


def seed(rt: Runtime, standin: Running, n: int, *, known: bool = True) -> list[str]:
    """n users stored without a publicToken (the stand-in knows them unless told not to)."""
    humans = [factories.human_id() for _ in range(n)]
    with rt.db() as db:
        for h in humans:
            tokens.save_tokens(
                db,
                rt.cipher,
                human_id=h,
                client_user_id=f"{h}@app",
                access_token=f"access-{h}",
                public_token=None,
                received_us=now_us(),
                session_hash=h,
            )
        db.commit()
    if known:
        standin.state.known_humans.update(humans)
    return humans


def missing(rt: Runtime) -> int:
    with rt.db() as db:
        return int(db.scalar(select(func.count()).where(User.public_token.is_(None))) or 0)


def repairer(rt: Runtime) -> Repairer:
    return Repairer(rt, factories.free_slot, threads=8)


@pytest.mark.slow
def test_faulty_upstream_all_repaired_in_a_few_runs_one_event_each(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """1,000 users, 20 % 503 and 10 % 429: all repaired within a few runs, one event each."""
    humans = seed(runtime, standin, 1000)
    standin.state.faults = Faults(p503=0.2, p429=0.1, retry_after_s=0.05)
    runs = 0
    clock = [now_us()]
    # Each later run happens after the backoff has passed (time moves through now()).
    with mock.patch("humanconnect.jobs.repair.now_us", lambda: clock[0]):
        # A run tries each user up to four times within the inline budget (0.2 s here), so
        # how many runs it takes depends on the machine's pace.
        while missing(runtime) and runs < 8:
            repairer(runtime).run()
            runs += 1
            clock[0] += int(repair.BACKOFF_CAP_S * 1.2 * 1_000_000)
    assert missing(runtime) == 0, runs
    events = [e for e in stream_entries(redis_client) if e["type"] == "publictoken.repaired"]
    assert sorted(e["humanId"] for e in events) == sorted(humans)
    assert len({e["eventId"] for e in events}) == 1000
    with runtime.db() as db:
        for h in humans:
            user = tokens.get_user(db, runtime.cipher, f"{h}@app")
            assert user is not None and user.public_token == standin.state.public_tokens[h]


def test_transient_failures_back_off_and_wait(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A user failing transiently is not tried again before its growing backoff."""
    (human,) = seed(runtime, standin, 1)
    standin.state.faults = Faults(down=True)
    repairer(runtime).run()
    calls = standin.state.public_calls[human]
    repairer(runtime).run()  # straight after: still backing off
    assert standin.state.public_calls[human] == calls
    with runtime.db() as db:
        first = db.scalar(select(User.repair_after_us))
        assert first is not None and first > now_us() + 50_000_000
    # A later run, after the backoff, tries again and doubles it.
    with mock.patch("humanconnect.jobs.repair.now_us", lambda: first + 1):
        repairer(runtime).run()
    with runtime.db() as db:
        row = db.scalars(select(User)).one()
        assert row.repair_attempts == 2 and row.repair_after_us is not None
        assert row.repair_after_us - first > 100_000_000


def test_unknown_human_is_called_once_then_recorded(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A 404 is recorded with its reason and not asked again, until an operator says so."""
    (human,) = seed(runtime, standin, 1, known=False)
    for _ in range(3):
        repairer(runtime).run()
    assert standin.state.public_calls[human] == 1
    with runtime.db() as db:
        assert "404" in (db.scalar(select(User.repair_error)) or "")
    assert repair.retry_failed(runtime) == 1
    repairer(runtime).run()
    assert standin.state.public_calls[human] == 2


def test_two_runs_at_once_send_each_user_once(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """Two runs started together: one works, the other is skipped; nobody is asked twice."""
    humans = seed(runtime, standin, 300)
    standin.state.faults = Faults(latency_ms=5)
    barrier = threading.Barrier(2)
    reports = []

    def go() -> None:
        barrier.wait()
        reports.append(repairer(runtime).run())

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.skipped for r in reports) == [False, True]
    assert all(standin.state.public_calls[h] == 1 for h in humans)
    assert missing(runtime) == 0


def test_newer_finish_during_repair_keeps_its_token(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A finish that stores tokens while the repair call is in flight wins."""
    (human,) = seed(runtime, standin, 1)
    original = repair.fetch_public_token

    def slow_fetch(*args: object, **kwargs: object) -> str:
        token = original(*args, **kwargs)  # type: ignore[arg-type]
        # Meanwhile a newer session of the same user is stored.
        with runtime.db() as db:
            tokens.save_tokens(
                db,
                runtime.cipher,
                human_id=human,
                client_user_id=f"{human}@app",
                access_token="newer-access",
                public_token="newer-public-token-0000000000000",
                received_us=now_us(),
                session_hash="newer",
            )
            db.commit()
        return token

    with mock.patch("humanconnect.jobs.repair.fetch_public_token", slow_fetch):
        report = repairer(runtime).run()
    assert report.superseded == 1 and report.repaired == 0
    with runtime.db() as db:
        user = tokens.get_user(db, runtime.cipher, f"{human}@app")
    assert user is not None and user.public_token == "newer-public-token-0000000000000"
    assert not [e for e in stream_entries(redis_client) if e["type"] == "publictoken.repaired"]


def test_dead_runs_lock_expires_and_the_next_run_resumes(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A run killed mid-way leaves a lock that expires; the next run repairs the rest."""
    seed(runtime, standin, 500)
    # Given a run that repaired one batch and died holding the lock
    repairer(runtime).run(limit=repair.BATCH)
    dead = Lock(runtime.redis, LOCK_KEY, timeout=1)
    assert dead.acquire(blocking=False)
    assert repairer(runtime).run().skipped
    # When its lock expires
    wait_for(lambda: not runtime.redis.exists(LOCK_KEY), 30, what="the dead run's lock to expire")
    # Then the next run picks up where it stopped
    report = repairer(runtime).run()
    assert not report.skipped and report.repaired == 500 - repair.BATCH
    assert missing(runtime) == 0


def test_dry_run_counts_and_calls_nothing(runtime: Runtime, standin: Running, redis_client) -> None:
    """--dry-run lists who would be repaired and sends nothing upstream."""
    humans = seed(runtime, standin, 30)
    report = repairer(runtime).run(dry_run=True, limit=20)
    assert report.seen == 20 and len(report.dry_run) == 20 and set(report.dry_run) <= set(humans)
    assert standin.state.calls.total() == 0
    assert missing(runtime) == 30


def _seed_env(d: Deployment, standin: Running, n: int) -> list[str]:
    settings = Settings.model_validate({k: v for k, v in d.env.items() if k.isupper()})
    return seed(Runtime(settings), standin, n)


@pytest.mark.slow
# The lock's expiry is Redis's, the same on either database: SQLite only (it waits a minute).
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_killed_worker_mid_repair_next_run_finishes(deploy, standin: Running, redis_client) -> None:
    """SIGKILL the worker mid-repair: its lock expires, a new worker's run repairs the rest."""
    import signal

    from humanconnect import events
    from humanconnect.queue import RELAY_TASK, REPAIR_TASK
    from humanconnect.queue import sender as queue_sender

    # Given 2,000 users and a worker repairing them slowly
    standin.state.faults = Faults(latency_ms=20)
    d = deploy()
    humans = _seed_env(d, standin, 2000)
    sender = queue_sender(Settings.model_validate({"REDIS_URL": d.env["REDIS_URL"]}), "test-sender")
    sender.send_task(REPAIR_TASK)
    wait_for(lambda: len(standin.state.public_tokens) >= 300, 60, what="the repair under way")
    # When the worker is killed outright
    d.worker.signal(signal.SIGKILL)
    d.worker.proc.wait(10)
    ttl = redis_client.pttl(LOCK_KEY)
    assert 0 < ttl <= repair.LOCK_TTL_S * 1000
    # Redis ends the dead worker's lock within LOCK_TTL_S (just checked): bring that moment
    # forward rather than spend a minute of CI on Redis's own clock.
    redis_client.pexpire(LOCK_KEY, 1)
    wait_for(lambda: not redis_client.exists(LOCK_KEY), 5, what="the dead worker's lock to expire")
    # Then a new worker's run picks up where it stopped
    worker = start_worker(d.env, ROOT, d.worker.log_path.with_name("worker2.log"))
    try:
        sender.send_task(REPAIR_TASK)
        rt = Runtime(Settings.model_validate({k: v for k, v in d.env.items() if k.isupper()}))
        wait_for(lambda: missing(rt) == 0, 120, interval=0.5, what="every user repaired")

        # A batch the dead worker committed but had not yet relayed waits in the outbox for
        # beat's sweep (no beat here): run the sweep as beat would, until every event is out.
        def repaired_events() -> list[str]:
            sender.send_task(RELAY_TASK)
            stream = stream_entries(redis_client)
            return sorted(e["humanId"] for e in stream if e["type"] == "publictoken.repaired")

        wait_for(
            lambda: repaired_events() == sorted(humans),
            events.SWEEP_GRACE_S + 30,
            interval=1,
            what="one publictoken.repaired event per user",
        )
    finally:
        worker.stop()


def test_repair_command_dry_run_then_real(deploy, standin: Running) -> None:
    """`humanconnect repair --dry-run` counts without calling; the real run repairs them all."""
    import subprocess

    d = deploy()
    _seed_env(d, standin, 25)
    cli = [str(BIN / "humanconnect"), "repair"]
    dry = subprocess.run(
        [*cli, "--dry-run"], env=d.env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    assert "25 users would be repaired" in dry.stdout
    assert standin.state.calls.total() == 0
    real = subprocess.run(
        [*cli, "--limit", "10"], env=d.env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert real.returncode == 0, real.stderr
    assert "seen 10: repaired 10" in real.stdout
    assert sum(standin.state.public_calls.values()) == 10
