"""Completion events: outbox in the same transaction, relayed once Redis takes them."""

from __future__ import annotations

import json

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from humanconnect import events
from humanconnect.exchange import Exchanger
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.storage.models import OutboxEvent
from tests import factories
from tests.support.env import wait_for
from tests.support.scan import assert_no_secrets, stream_entries
from tests.support.servers import RedisServer

STREAM = "humanconnect:events"


def stream(r: redis.Redis, name: str = STREAM) -> list[dict[str, str]]:
    return stream_entries(r, name)


def sent_at(runtime: Runtime) -> object:
    with runtime.db() as db:
        return db.scalars(select(OutboxEvent.sent_at)).one()


def test_success_emits_one_completed_event(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A stored token set yields exactly one connect.completed, with no token in it."""
    job = factories.job()
    Exchanger(runtime, factories.free_slot).run(job)
    entries = stream(runtime.redis)
    assert len(entries) == 1
    event = entries[0]
    issued = standin.state.by_human[job.human_id]
    assert event["type"] == "connect.completed"
    assert event["humanId"] == job.human_id and event["requestId"] == job.request_id
    assert event["clientUserId"] == issued.client_user_id
    assert {"eventId", "occurredAt"} <= event.keys()
    assert_no_secrets(
        [issued.access_token, issued.public_token, job.session_token], texts={"event": str(event)}
    )
    # Marked sent within the batching delay (events.SentMarks), with no other exchange
    # to carry it.
    wait_for(lambda: sent_at(runtime) is not None, 2, what="the event marked sent")
    # A duplicate delivery emits nothing more.
    Exchanger(runtime, factories.free_slot).run(job)
    assert len(stream(runtime.redis)) == 1


def test_permanent_failure_emits_one_failed_event(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A refusal yields one connect.failed with a short reason."""
    standin.state.faults = Faults(refuse_status=401)
    job = factories.job()
    Exchanger(runtime, factories.free_slot).run(job)
    (event,) = stream(runtime.redis)
    assert event["type"] == "connect.failed" and "401" in event["error"]
    assert event["requestId"] == job.request_id


def test_events_wait_out_a_redis_outage(make_settings, db_url: str, own_redis: RedisServer) -> None:
    """Committed while Redis is away, an event stays pending and is relayed once it is back."""
    rt = Runtime(make_settings(DATABASE_URL=db_url, REDIS_URL=own_redis.url))
    with rt.db() as db:
        events.record(db, "connect.completed", humanId="h1", clientUserId="u1", requestId="r1")
        db.commit()
    own_redis.kill()
    with rt.db() as db, pytest.raises(redis.exceptions.ConnectionError):
        events.relay_pending(db, rt.redis, STREAM, limit=10, grace_s=0)
    with rt.db() as db:
        assert events.backlog(db) == 1
    own_redis.start()
    with rt.db() as db:
        assert events.relay_pending(db, rt.redis, STREAM, grace_s=0) == 1
        assert events.backlog(db) == 0
    (entry,) = stream(rt.redis)
    assert entry["humanId"] == "h1"


def test_relay_dying_after_xadd_resends_the_same_event_id(
    make_settings, db_url: str, redis_client
) -> None:
    """XADD done, mark not committed: the next relay sends it again with the same eventId."""
    rt = Runtime(make_settings(DATABASE_URL=db_url))
    with rt.db() as db:
        event = events.record(db, "connect.failed", humanId="h2", requestId="r2", error="x")
        db.commit()
        event_id = event.id
    # Given a relay whose process dies between XADD and its commit
    with rt.db() as db:
        original = db.commit

        def die() -> None:
            raise SystemExit("killed between XADD and commit")

        db.commit = die
        with pytest.raises(SystemExit):
            events.relay_ids(db, rt.redis, STREAM, [event_id])
        db.commit = original
        db.rollback()
    # When the sweep comes by
    with rt.db() as db:
        assert events.backlog(db) == 1
        assert events.relay_ids(db, rt.redis, STREAM, [event_id]) == 1
    # Then the stream has it twice, one eventId: consumers dedupe on it
    entries = stream(rt.redis)
    assert len(entries) == 2 and entries[0]["eventId"] == entries[1]["eventId"]


def test_events_refuse_secret_fields(make_settings, sqlite_url: str) -> None:
    """No caller can put a token or the secret into an event."""
    rt = Runtime(make_settings(DATABASE_URL=sqlite_url))
    with rt.db() as db, pytest.raises(ValueError):
        events.record(db, "connect.completed", humanId="h", accessToken="nope")


def test_readme_consumer_prints_each_event_once(redis_url: str, redis_client) -> None:
    """The example consumer reads the stream with a group and skips a re-sent eventId."""
    import subprocess
    import sys

    from tests.support.env import ROOT, service_env

    fields = {
        "type": "connect.completed",
        "eventId": "e-1",
        "humanId": "h-1",
        "clientUserId": "u-1",
        "requestId": "r-1",
        "occurredAt": "2026-11-28T00:00:00+00:00",
    }
    redis_client.xadd(STREAM, fields)
    redis_client.xadd(STREAM, fields)  # the same event relayed twice
    out = subprocess.run(
        [sys.executable, "examples/consumer.py", "--once"],
        cwd=ROOT,
        env=service_env(REDIS_URL=redis_url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["connect.completed humanId=h-1 eventId=e-1"]
    assert redis_client.xpending(STREAM, "my-app")["pending"] == 0


def test_sent_marks_are_batched_and_a_refused_batch_is_left_for_the_sweep(
    runtime: Runtime, redis_client
) -> None:
    """Many relayed events, one UPDATE; a batch the database refuses stays unsent, and the
    sweep (after its grace) sends those events again, with the same eventIds."""
    from sqlalchemy import event as sa_event

    with runtime.db() as db:
        recorded = [events.record(db, "connect.completed", humanId=f"h{i}") for i in range(30)]
        db.commit()
    updates: list[str] = []
    engine = runtime.db().get_bind()
    sa_event.listen(engine, "before_cursor_execute", lambda *a: updates.append(a[2]))
    # Given 20 events marked from many calls within the delay
    marks = events.SentMarks(runtime.db, delay_s=0.3)
    for e in recorded[:20]:
        marks.add([e.id])

    def unsent() -> list[int]:
        with runtime.db() as db:
            query = select(OutboxEvent.id).where(OutboxEvent.sent_at.is_(None))
            return sorted(db.scalars(query).all())

    # Then one UPDATE marked all of them
    wait_for(lambda: unsent() == sorted(e.id for e in recorded[20:]), 3, what="the batch")
    assert len([u for u in updates if u.lstrip().upper().startswith("UPDATE")]) == 1
    # When the database refuses the next batch
    broken = events.SentMarks(
        lambda: (_ for _ in ()).throw(OperationalError("x", {}, Exception("down")))
    )
    broken.add([e.id for e in recorded[20:]])
    broken.flush()
    # Then those events are still unsent, and the sweep relays them past its grace
    with runtime.db() as db:
        assert events.relay_pending(db, runtime.redis, STREAM, grace_s=0) == 10
    ids = {entry["eventId"] for entry in stream(runtime.redis)}
    assert ids == {json.loads(e.fields)["eventId"] for e in recorded[20:]}
