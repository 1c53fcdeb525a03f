"""The exchange logic against a real Redis, a real database and the stand-in (no Celery)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select

from humanconnect import redis_keys, status_records
from humanconnect.crypto import session_hash
from humanconnect.exchange import Exchanger
from humanconnect.request import Job
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.states import RequestState
from humanconnect.storage import tokens
from humanconnect.storage.models import SessionRecord, User
from tests import factories
from tests.support.scan import stream_entries


def exchanger(rt: Runtime) -> Exchanger:
    return Exchanger(rt, factories.free_slot)


def session_row(rt: Runtime, job: Job) -> SessionRecord:
    with rt.db() as db:
        row = db.get(SessionRecord, session_hash(job.session_token))
        assert row is not None
        return row


@contextmanager
def commit_lands_but_breaks() -> Iterator[list[bool]]:
    """The first COMMIT after the exchange records an event applies, then raises as if the
    connection broke before its answer came back; yields whether that happened."""
    from unittest import mock

    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    from humanconnect import events

    real_commit, real_record = Session.commit, events.record
    armed: list[bool] = []
    fired: list[bool] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        armed.append(True)
        return real_record(*args, **kwargs)

    def commit(self: Session) -> None:
        real_commit(self)
        if armed and not fired:
            fired.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    with (
        mock.patch("humanconnect.exchange.events.record", side_effect=record),
        mock.patch.object(Session, "commit", commit),
    ):
        yield fired


def test_success_stores_encrypted_tokens_and_status(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A good session ends `succeeded`, its tokens stored encrypted and readable back."""
    job = factories.job()
    outcome = exchanger(runtime).run(job)
    assert outcome.state == "succeeded" and outcome.upstream_calls == 1
    issued = standin.state.by_human[job.human_id]
    with runtime.db() as db:
        raw = db.scalar(select(User).where(User.human_id == job.human_id))
        assert raw is not None
        assert issued.access_token not in raw.access_token
        assert issued.public_token not in (raw.public_token or "")
        user = tokens.get_user(db, runtime.cipher, issued.client_user_id)
    assert user is not None
    assert user.access_token == issued.access_token
    assert user.public_token == issued.public_token
    record = status_records.get_state(runtime.redis, job.request_id)
    assert record is not None and record["state"] == "succeeded"
    assert record["clientUserId"] == issued.client_user_id
    assert runtime.cipher.open(record["publicToken"]) == issued.public_token
    assert issued.access_token not in str(record)


def test_second_delivery_never_calls_upstream_again(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A duplicate delivery after success is answered from the record: one upstream call."""
    job = factories.job()
    ex = exchanger(runtime)
    assert ex.run(job).state == "succeeded"
    again = ex.run(job)
    assert again.state == "succeeded" and again.upstream_calls == 0
    assert sum(standin.state.exchanges.values()) == 1
    assert standin.state.calls["tokens:used"] == 0


def test_duplicate_under_another_request_id_mirrors_the_outcome(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """The same session queued twice (a producer retry) resolves the second request too."""
    first = factories.job()
    second = factories.job(session_token=first.session_token, human_id=first.human_id)
    assert exchanger(runtime).run(first).state == "succeeded"
    assert exchanger(runtime).run(second).state == "succeeded"
    record = status_records.get_state(runtime.redis, second.request_id)
    assert record is not None and record["state"] == "succeeded"
    assert (
        runtime.cipher.open(record["publicToken"])
        == standin.state.by_human[first.human_id].public_token
    )
    assert sum(standin.state.exchanges.values()) == 1


@pytest.mark.parametrize("code", [401, 400, 403, 404])
def test_permanent_refusal_fails_without_retry(
    runtime: Runtime, standin: Running, redis_client, code: int
) -> None:
    """A 4xx refusal ends `failed` with a reason after exactly one call."""
    standin.state.faults = Faults(refuse_status=code)
    job = factories.job()
    outcome = exchanger(runtime).run(job)
    assert outcome.state == "failed" and outcome.retry_in is None
    assert outcome.upstream_calls == 1
    row = session_row(runtime, job)
    assert row.state == "failed" and row.error_kind == "permanent"
    assert str(code) in (row.error or "")
    record = status_records.get_state(runtime.redis, job.request_id)
    assert record is not None and record["state"] == "failed" and str(code) in record["error"]


def test_transient_outage_asks_for_a_later_retry(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """503s past the inline budget end the run as `retrying` with a countdown, not failed."""
    standin.state.faults = Faults(down=True)
    job = factories.job()
    outcome = exchanger(runtime).run(job, retries=3)
    assert outcome.state == "retrying"
    assert (
        outcome.retry_in is not None
        and 0 < outcome.retry_in <= runtime.settings.retry_max_countdown_s
    )
    assert 1 <= outcome.upstream_calls <= 4
    assert session_row(runtime, job).state == "retrying"
    # When the upstream is back, the next delivery finishes it.
    standin.state.faults = Faults()
    assert exchanger(runtime).run(job, retries=4).state == "succeeded"


def test_retry_after_is_honoured_in_the_countdown(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A 429 asking for 30 s is not retried sooner than that."""
    standin.state.faults = Faults(p429=1.0, retry_after_s=30)
    outcome = exchanger(runtime).run(factories.job())
    assert outcome.state == "retrying" and outcome.retry_in is not None
    assert outcome.retry_in >= 30
    # The inline retries stop rather than sleep 30 s in a worker thread.
    assert outcome.upstream_calls == 1


def test_outage_longer_than_the_window_fails_as_transient(
    make_settings, db_url: str, standin: Running, redis_client
) -> None:
    """Past the retry window, a session fails saying the upstream was down, with its event."""
    rt = Runtime(
        make_settings(
            DATABASE_URL=db_url, HUMANAPI_BASE_URL=standin.url, HUMANCONNECT_RETRY_WINDOW_S="1"
        )
    )
    standin.state.faults = Faults(down=True)
    job = factories.job(received_us=factories.now_us() - 5_000_000)
    outcome = exchanger(rt).run(job)
    assert outcome.state == "failed"
    row = session_row(rt, job)
    assert row.error_kind == "transient" and "retry window" in (row.error or "")
    (event,) = stream_entries(rt.redis)
    assert event["type"] == "connect.failed" and "retry window" in event["error"]


def test_lost_answer_then_refusal_is_reported_apart(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """Upstream consumed the token but the answer was dropped: failed as `answer_lost`."""
    standin.state.faults = Faults(drop_after=1.0)
    job = factories.job()
    outcome = exchanger(runtime).run(job)
    # The inline retry hits the consumed token and is refused.
    assert outcome.state == "failed"
    row = session_row(runtime, job)
    assert row.error_kind == "answer_lost"
    assert "connect again" in (row.error or "")
    assert sum(standin.state.exchanges.values()) == 1


def test_older_session_never_overwrites_newer(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """Two sessions of one user finishing in reverse order: the newer tokens stay."""
    human = factories.human_id()
    older = factories.job(human_id=human, received_us=factories.now_us() - 1_000_000)
    newer = factories.job(human_id=human)
    ex = exchanger(runtime)
    assert ex.run(newer).state == "succeeded"
    newer_tokens = standin.state.by_session[newer.session_token]
    assert ex.run(older).state == "succeeded"
    with runtime.db() as db:
        user = tokens.get_user(db, runtime.cipher, newer_tokens.client_user_id)
    assert user is not None
    assert user.access_token == newer_tokens.access_token
    assert user.public_token == newer_tokens.public_token


def test_busy_session_is_not_run_twice_at_once(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """While one delivery holds a session, another backs off without calling upstream."""
    from redis.lock import Lock

    job = factories.job()
    held = Lock(runtime.redis, redis_keys.session_lock(session_hash(job.session_token)), timeout=30)
    assert held.acquire(blocking=False)
    try:
        outcome = exchanger(runtime).run(job)
    finally:
        held.release()
    assert outcome.state == "busy" and outcome.retry_in
    assert standin.state.calls.total() == 0


def test_refusal_after_a_crashed_run_is_answer_lost(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A run that died mid-call left `running`: a refusal on redelivery means a lost answer."""
    job = factories.job()
    # Given a first run that reached the upstream and died before recording anything
    standin.state.faults = Faults(drop_after=1.0)
    with runtime.db() as db:
        row = factories.session_row(db, job, runtime.cipher)
        row.state, row.attempts = "running", 1
        db.commit()
    from humanconnect.upstream.client import exchange_tokens

    with pytest.raises(Exception):  # noqa: B017 - the dropped answer
        exchange_tokens(
            standin.url,
            human_id=job.human_id,
            client_id=job.client_id,
            client_secret=runtime.settings.client_secret.get_secret_value(),  # type: ignore[union-attr]
            session_token=job.session_token,
            connect_timeout=1,
            read_timeout=2,
        )
    standin.state.faults = Faults()
    # When the message is redelivered
    outcome = exchanger(runtime).run(job, retries=0)
    # Then the refusal is reported as a lost answer, not a plain refusal
    assert outcome.state == "failed"
    assert session_row(runtime, job).error_kind == "answer_lost"


def test_tokens_and_success_commit_together(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """A crash between the token upsert and the session's success leaves neither behind."""
    from unittest import mock

    job = factories.job()
    # Given a store step that dies after the upsert (inside its transaction)
    with mock.patch("humanconnect.exchange.events.record", side_effect=SystemExit("killed")):
        with pytest.raises(SystemExit):
            exchanger(runtime).run(job)
    # Then no tokens were committed without the session's success
    with runtime.db() as db:
        assert db.scalar(select(User).where(User.human_id == job.human_id)) is None
        row = db.get(SessionRecord, session_hash(job.session_token))
        assert row is not None and row.state == "running"


def test_a_commit_that_landed_but_lost_its_answer_yields_one_event(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """The connection breaks while the store's COMMIT is in flight, after the database applied
    it: the retry must find the session stored and not record a second event (the chaos
    test's PostgreSQL cut produced two connect.completed for one session before this)."""
    from humanconnect.storage.models import OutboxEvent

    job = factories.job()
    with commit_lands_but_breaks() as fired:
        outcome = exchanger(runtime).run(job)
    assert fired and outcome.state == "succeeded"
    with runtime.db() as db:
        recorded = db.scalars(select(OutboxEvent.fields)).all()
    assert len(recorded) == 1 and job.human_id in recorded[0]
    assert (status_records.get_state(redis_client, job.request_id) or {}).get(
        "state"
    ) == "succeeded"
    assert standin.state.exchanges[job.session_token] == 1


def lock_key(job: Job) -> str:
    return redis_keys.session_lock(session_hash(job.session_token))


def test_taking_the_lock_marks_running_but_never_reopens_an_ended_request(
    runtime: Runtime, redis_client
) -> None:
    """The lock and the `running` mark share one round trip; an ended record stays ended."""
    job = factories.job()

    def take(token: str) -> bool:
        return status_records.lock_and_begin(
            runtime.redis, lock_key(job), token, 30_000, job.request_id, job.human_id, 60
        )

    def state() -> str | None:
        return (status_records.get_state(runtime.redis, job.request_id) or {}).get("state")

    # Given a queued request, taking its lock marks it running and records progress
    status_records.set_state(
        runtime.redis, job.request_id, RequestState.QUEUED, 60, humanId=job.human_id
    )
    assert take("t1")
    assert state() == "running"
    assert runtime.redis.zscore(redis_keys.PENDING, job.request_id) is not None
    # While held, another delivery neither gets the lock nor touches the record
    status_records.set_state(
        runtime.redis, job.request_id, RequestState.SUCCEEDED, 60, humanId=job.human_id
    )
    assert not take("t2")
    assert runtime.redis.get(lock_key(job)) == b"t1"
    # And once free, a duplicate delivery gets the lock but the record stays succeeded
    runtime.redis.delete(lock_key(job))
    assert take("t3")
    assert state() == "succeeded"


def test_the_lock_is_released_with_the_success_or_after_a_failed_announce(
    runtime: Runtime, standin: Running, redis_client, monkeypatch
) -> None:
    """Released in the success's round trip; if that round trip fails, by the run itself."""
    import redis as redis_lib

    ex = exchanger(runtime)
    # Given a success, no lock is left behind
    job = factories.job()
    assert ex.run(job).state == "succeeded"
    assert not runtime.redis.exists(lock_key(job))
    # When the success's round trip fails
    real = runtime.redis.pipeline

    class Failing(redis_lib.client.Pipeline):
        def execute(self, raise_on_error: bool = True) -> list[Any]:
            if any(c[0][0] == "EVAL" for c in self.command_stack):
                raise redis_lib.exceptions.ConnectionError("cut")
            return super().execute(raise_on_error)

    def failing(*args: Any, **kwargs: Any) -> Any:
        pipe = real(*args, **kwargs)
        pipe.__class__ = Failing
        return pipe

    monkeypatch.setattr(runtime.redis, "pipeline", failing)
    second = factories.job()
    with pytest.raises(redis_lib.exceptions.ConnectionError):
        ex.run(second)
    # Then the run's own release still frees the session for the task's retry
    assert not runtime.redis.exists(lock_key(second))
    assert session_row(runtime, second).state == "succeeded"


def test_a_mismatch_recorded_through_a_locked_database_stays_a_mismatch(
    runtime: Runtime, standin: Running
) -> None:
    """The upstream answers for another user than the ticket vouched for, and the failure's
    first two tries meet a locked database (before they write anything): the record waits
    it out in this run, so the session ends client_user_mismatch after one call, not
    answer_lost on a redelivery that finds its token used (seen in CI under SQLite's lock
    with 32 threads)."""
    from unittest import mock

    from sqlalchemy.exc import OperationalError

    from humanconnect.states import ErrorKind
    from humanconnect.storage import sessions

    job = factories.job(expected_client_user_id="someone-else")
    real = sessions.mark_failed
    tries: list[int] = []

    def locked_twice(*args, **kwargs):
        tries.append(1)
        if len(tries) <= 2:
            raise OperationalError("UPDATE sessions", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    with mock.patch("humanconnect.exchange.sessions.mark_failed", side_effect=locked_twice):
        outcome = exchanger(runtime).run(job)
    assert outcome.state == "failed"
    assert len(tries) == 3
    row = session_row(runtime, job)
    assert (row.state, row.error_kind) == ("failed", ErrorKind.CLIENT_USER_MISMATCH)
    assert standin.state.exchanges[job.session_token] == 1
    assert standin.state.calls["tokens:used"] == 0


def test_failed_retry_requeues_a_finish_with_its_connected_sources(
    make_settings, db_url: str, standin: Running, redis_client
) -> None:
    """A finish carrying the Connect client's sources fails for the whole window; `failed
    --retry` queues it again with the same sources, in its message and in the status record
    the reconciler re-sends from (before, both had none, and so had the retried finish's
    connect.completed, which `exchange.py` builds from the job's sources)."""
    from humanconnect.jobs.failures import requeue_transient
    from humanconnect.request import ExchangeRequest

    rt = Runtime(
        make_settings(
            DATABASE_URL=db_url, HUMANAPI_BASE_URL=standin.url, HUMANCONNECT_RETRY_WINDOW_S="1"
        )
    )
    standin.state.faults = Faults(down=True)
    job = factories.job(
        received_us=factories.now_us() - 5_000_000, connected_sources="Fitbit,Withings"
    )
    assert exchanger(rt).run(job).state == "failed"
    sent: list[ExchangeRequest] = []
    assert requeue_transient(rt, sent.append) == 1
    (again,) = sent
    assert again.request_id == job.request_id
    assert again.connected_sources == "Fitbit,Withings"
    # And the status record the reconciler re-sends from carries them too.
    record = status_records.get_state(redis_client, job.request_id) or {}
    assert record.get("connectedSources") == "Fitbit,Withings"


def test_a_mismatch_whose_failure_commit_landed_but_lost_its_answer_yields_one_event(
    runtime: Runtime, standin: Running, redis_client
) -> None:
    """The connection breaks while the mismatch's failure COMMIT is in flight, after the
    database applied it: the next try finds the session failed and writes no second
    connect.failed (webhook receivers would get two, under different eventIds)."""
    from humanconnect.states import ErrorKind
    from humanconnect.storage.models import OutboxEvent

    job = factories.job(expected_client_user_id="someone-else")
    with commit_lands_but_breaks() as fired:
        outcome = exchanger(runtime).run(job)
    assert fired and outcome.state == "failed"
    with runtime.db() as db:
        recorded = db.scalars(select(OutboxEvent.fields)).all()
    assert len(recorded) == 1 and '"connect.failed"' in recorded[0], recorded
    row = session_row(runtime, job)
    assert (row.state, row.error_kind) == ("failed", ErrorKind.CLIENT_USER_MISMATCH)
    record_ = status_records.get_state(redis_client, job.request_id) or {}
    assert record_.get("state") == "failed"
    assert standin.state.exchanges[job.session_token] == 1
