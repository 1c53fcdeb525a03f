"""A batch of sessions run together (humanconnect/exchange_batch.py) against a real Redis, a
real database and the stand-in: each session ends in its own right state, as it would have
alone, and nothing is exchanged or announced twice."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest import mock

import pytest
from redis import Redis
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from humanconnect import redis_keys
from humanconnect.crypto import session_hash
from humanconnect.exchange import Exchanger
from humanconnect.exchange_batch import Batch, Item
from humanconnect.request import Job
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Running
from humanconnect.settings import Settings
from humanconnect.states import ErrorKind, RequestState
from humanconnect.storage.models import OutboxEvent, SessionRecord
from tests import factories
from tests.test_exchange import commit_lands_but_breaks


@pytest.fixture
def rt(make_settings: Callable[..., Settings], db_url: str, standin: Running) -> Runtime:
    # No inline retries: a transient refusal goes straight back to the queue.
    return Runtime(
        make_settings(
            DATABASE_URL=db_url,
            HUMANAPI_BASE_URL=standin.url,
            HUMANAPI_AUTH_URL=standin.url,
            HUMANCONNECT_RETRY_INLINE_BUDGET_S="0",
        )
    )


@pytest.fixture
def calls() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as pool:
        yield pool


def run(rt: Runtime, calls: ThreadPoolExecutor, jobs: list[Job]) -> list[Item]:
    items = [Item(job) for job in jobs]
    Batch(Exchanger(rt, factories.free_slot), calls).run(items)
    return items


def row(rt: Runtime, job: Job) -> SessionRecord:
    with rt.db() as db:
        found = db.get(SessionRecord, session_hash(job.session_token))
        assert found is not None
        return found


def events_of(rt: Runtime, job: Job) -> list[str]:
    """The types of the outbox's events for `job`'s request."""
    with rt.db() as db:
        rows = [json.loads(e.fields) for e in db.scalars(select(OutboxEvent)).all()]
    return [f["type"] for f in rows if f.get("requestId") == job.request_id]


def test_mixed_batch_ends_each_session_in_its_own_state(
    rt: Runtime, standin: Running, calls: ThreadPoolExecutor, redis_client: Redis
) -> None:
    """Successes, a permanent refusal, a transient one, a lost answer and a session already
    final, in one batch: each ends as it would have alone, no token is exchanged twice, and
    every lock is let go."""
    faults = standin.state.faults
    faults.refuse_token_prefix = "junk-"
    faults.unavailable_token_prefix = "down-"
    faults.drop_token_prefix = "lost-"
    ex = Exchanger(rt, factories.free_slot)
    good = [factories.job() for _ in range(3)]
    refused = factories.job(session_token="junk-" + factories.session_token())
    transient = factories.job(session_token="down-" + factories.session_token())
    lost = factories.job(session_token="lost-" + factories.session_token())
    finished = factories.job()
    assert ex.run(finished).state == RequestState.SUCCEEDED
    # Its events marked sent now, not by the timer during the batch: on SQLite that write
    # would race the batch's own (the single path meets the same race, as an infrastructure
    # retry; this test is about the batch's outcomes).
    ex.announce.sent.flush()
    jobs = [*good, refused, transient, lost, finished]

    items = [Item(job) for job in jobs]
    Batch(ex, calls).run(items)

    by = {item.job.request_id: item for item in items}
    assert all(item.error is None for item in items), [i.error for i in items]
    for job in good:
        assert by[job.request_id].outcome.state == RequestState.SUCCEEDED  # type: ignore[union-attr]
        assert row(rt, job).state == RequestState.SUCCEEDED
        assert events_of(rt, job) == ["connect.completed"]
        assert job.human_id in standin.state.by_human
    assert by[refused.request_id].outcome.state == RequestState.FAILED  # type: ignore[union-attr]
    assert row(rt, refused).error_kind == ErrorKind.PERMANENT
    assert events_of(rt, refused) == ["connect.failed"]
    retrying = by[transient.request_id].outcome
    assert retrying is not None and retrying.state == RequestState.RETRYING
    assert retrying.retry_in is not None and retrying.retry_in > 0
    assert row(rt, transient).state == RequestState.RETRYING
    assert events_of(rt, transient) == []
    # The lost answer is a transient error at first (the call may have reached the
    # upstream): the record remembers it.
    assert by[lost.request_id].outcome.state == RequestState.RETRYING  # type: ignore[union-attr]
    assert row(rt, lost).ambiguous
    # The session already final is mirrored, not called again.
    assert by[finished.request_id].outcome.state == RequestState.SUCCEEDED  # type: ignore[union-attr]
    assert events_of(rt, finished) == ["connect.completed"]
    # No token was sent twice (the stand-in counts a used token's second call), and no lock
    # is left held.
    assert standin.state.calls["tokens:used"] == 0
    assert max(standin.state.exchanges.values()) == 1
    for job in jobs:
        assert redis_client.get(redis_keys.session_lock(session_hash(job.session_token))) is None

    # Their next tries, together again: the upstream is back for the transient one, and
    # the lost answer's token is now refused as used, which names it.
    ex.announce.sent.flush()
    faults.unavailable_token_prefix = ""
    items = [Item(transient, retries=1), Item(lost, retries=1)]
    Batch(ex, calls).run(items)
    assert [i.outcome.state for i in items if i.outcome] == [
        RequestState.SUCCEEDED,
        RequestState.FAILED,
    ]
    assert events_of(rt, transient) == ["connect.completed"]
    assert row(rt, lost).error_kind == ErrorKind.ANSWER_LOST
    assert events_of(rt, lost) == ["connect.failed"]
    # Only the lost answer's token was sent again (and refused as used).
    assert standin.state.calls["tokens:used"] == 1
    assert max(standin.state.exchanges.values()) == 1


def test_the_same_session_twice_in_a_batch_is_exchanged_once(
    rt: Runtime, standin: Running, calls: ThreadPoolExecutor, redis_client: Redis
) -> None:
    """One session's two deliveries in one batch (the second runs alone, beside it): one
    exchanges it, the other finds it busy or done; the token is sent once, no lock is held."""
    twice = factories.job()
    again = Job(**{**twice.__dict__, "request_id": "again-" + twice.request_id})
    items = run(rt, calls, [twice, again])
    assert all(item.error is None for item in items), [i.error for i in items]
    states = {item.outcome.state for item in items}  # type: ignore[union-attr]
    assert RequestState.SUCCEEDED in states and states <= {RequestState.SUCCEEDED, "busy"}
    assert standin.state.calls["tokens:used"] == 0
    assert standin.state.exchanges[twice.session_token] == 1
    assert redis_client.get(redis_keys.session_lock(session_hash(twice.session_token))) is None


def test_a_store_whose_commit_broke_is_stored_once(rt: Runtime, calls: ThreadPoolExecutor) -> None:
    """The batch's store transaction commits but its connection breaks before the answer:
    each session then stores alone, finds its commit landed, and keeps its one event."""
    jobs = [factories.job() for _ in range(4)]
    with commit_lands_but_breaks() as fired:
        items = run(rt, calls, jobs)
    assert fired, "the batch's commit must have broken"
    assert [i.outcome.state for i in items if i.outcome] == [RequestState.SUCCEEDED] * 4
    for job in jobs:
        assert row(rt, job).state == RequestState.SUCCEEDED
        assert events_of(rt, job) == ["connect.completed"]
    with rt.db() as db:
        assert db.scalar(select(func.count()).select_from(OutboxEvent)) == 4


def test_a_batch_with_redis_away_ends_nothing_and_raises_nothing(
    rt: Runtime, calls: ThreadPoolExecutor, make_settings: Callable[..., Settings], db_url: str
) -> None:
    """Redis refusing the locks' round trip: every session gets the error to retry on, none
    is begun or called."""
    away = Runtime(make_settings(DATABASE_URL=db_url, REDIS_URL="redis://127.0.0.1:9/0"))
    jobs = [factories.job() for _ in range(3)]
    items = run(away, calls, jobs)
    assert all(i.outcome is None and i.error is not None for i in items)
    with rt.db() as db:
        assert db.scalar(select(func.count()).select_from(SessionRecord)) == 0


def test_one_sessions_fault_in_the_first_transaction_ends_only_it(
    rt: Runtime, calls: ThreadPoolExecutor, redis_client: Redis
) -> None:
    """A fault of one session's own statements undoes its savepoint only: it gets the error
    to retry on, the others are exchanged, and no lock is left held."""
    jobs = [factories.job() for _ in range(3)]
    real = Exchanger.begin_in

    def begin_in(self: Exchanger, db: Any, at: Any) -> Any:
        if at.job is jobs[1]:
            raise ValueError("a bug in one session's statements")
        return real(self, db, at)

    with mock.patch.object(Exchanger, "begin_in", begin_in):
        items = run(rt, calls, jobs)
    assert isinstance(items[1].error, ValueError) and items[1].outcome is None
    assert [items[0].outcome.state, items[2].outcome.state] == [RequestState.SUCCEEDED] * 2  # type: ignore[union-attr]
    for job in jobs:
        assert redis_client.get(redis_keys.session_lock(session_hash(job.session_token))) is None


def test_a_first_transaction_lost_with_its_connection_begins_nothing(
    rt: Runtime, standin: Running, calls: ThreadPoolExecutor, redis_client: Redis
) -> None:
    """The database going away under the first transaction: every session gets the error to
    retry on, none is called, no record is left and no lock is held."""
    jobs = [factories.job() for _ in range(3)]
    real = Exchanger.begin_in

    def begin_in(self: Exchanger, db: Any, at: Any) -> Any:
        if at.job is jobs[2]:
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return real(self, db, at)

    with mock.patch.object(Exchanger, "begin_in", begin_in):
        items = run(rt, calls, jobs)
    assert all(isinstance(i.error, OperationalError) and i.outcome is None for i in items)
    assert standin.state.exchanges.total() == 0
    with rt.db() as db:
        assert db.scalar(select(func.count()).select_from(SessionRecord)) == 0
    for job in jobs:
        assert redis_client.get(redis_keys.session_lock(session_hash(job.session_token))) is None
