"""Retention against a real Redis and SQLite/PostgreSQL: what goes past HUMANCONNECT_RETENTION_S,
and everything that stays (tokens, anything unfinished, an event a delivery still needs)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from humanconnect.clock import now
from humanconnect.jobs import retention
from humanconnect.locks import held_or_skip
from humanconnect.queue import RETENTION_TASK, celery_config
from humanconnect.redis_keys import RETENTION_LOCK
from humanconnect.request import ExchangeRequest
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings
from humanconnect.storage import tokens
from humanconnect.storage.models import (
    deliveries_table,
    outbox_table,
    sessions_table,
    users_table,
)
from tests import factories

RETENTION_S = 3600
# Every row is placed relative to one fixed moment, which the job's now() is patched to.
T = datetime(2026, 6, 1, 12, 0, 0, tzinfo=now().tzinfo)
OLD = T - timedelta(seconds=RETENTION_S + 60)
NEW = T - timedelta(seconds=RETENTION_S - 60)


@pytest.fixture
def rt(
    make_settings: Callable[..., Settings], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Runtime:
    monkeypatch.setattr(retention, "now", lambda: T)
    return Runtime(make_settings(DATABASE_URL=db_url, HUMANCONNECT_RETENTION_S=str(RETENTION_S)))


def add_session(rt: Runtime, state: str, at: datetime) -> str:
    """A `sessions` row in `state`, last changed `at`; its request id."""
    request_id = secrets.token_urlsafe(16)
    with rt.db() as db:
        db.execute(
            insert(sessions_table).values(
                session_hash=secrets.token_hex(32),
                request_id=request_id,
                human_id=factories.human_id(),
                received_us=0,
                state=state,
                attempts=1,
                ambiguous=False,
                sealed_session_token="sealed" if state == "failed" else None,
                created_at=at,
                updated_at=at,
            )
        )
        db.commit()
    return request_id


def add_event(
    rt: Runtime, sent_at: datetime | None, *deliveries: tuple[str, datetime | None]
) -> int:
    """An outbox row relayed at `sent_at` (None: not yet), with deliveries (state, settled
    at); its id."""
    with rt.db() as db:
        outbox_id = db.execute(
            insert(outbox_table)
            .values(event_id=secrets.token_hex(16), fields="{}", created_at=OLD, sent_at=sent_at)
            .returning(outbox_table.c.id)
        ).scalar_one()
        for number, (state, finished_at) in enumerate(deliveries):
            db.execute(
                insert(deliveries_table).values(
                    outbox_id=outbox_id,
                    endpoint=f"https://hooks.example/{number}",
                    state=state,
                    attempts=1,
                    due_us=0,
                    created_at=OLD,
                    finished_at=finished_at,
                )
            )
        db.commit()
    return int(outbox_id)


def ids(rt: Runtime, column: Any) -> set[Any]:
    """The values of `column` in its table."""
    with rt.db() as db:
        return set(db.scalars(select(column)).all())


def test_retention_deletes_exactly_what_is_finished_and_old(rt: Runtime, redis_client) -> None:
    """Finished sessions, relayed events and settled deliveries past the cutoff go; unfinished
    sessions, newer rows, unsent events, an event with a pending delivery and tokens stay."""
    # Given: rows of each kind on both sides of the cutoff
    gone_sessions = {add_session(rt, s, OLD) for s in ("succeeded", "failed")}
    kept_sessions = {add_session(rt, s, NEW) for s in ("succeeded", "failed")}
    kept_sessions |= {add_session(rt, s, OLD) for s in ("queued", "running", "retrying")}
    gone_events = {
        add_event(rt, OLD),
        add_event(rt, OLD, ("delivered", OLD), ("failed", OLD)),
    }
    kept_events = {
        add_event(rt, NEW),
        add_event(rt, None),
        # Unsettled: the dispatcher still sends this event.
        add_event(rt, OLD, ("pending", None)),
        # One delivery settled since the cutoff: it and its event stay.
        add_event(rt, OLD, ("delivered", OLD), ("failed", NEW)),
    }
    client_user = factories.stored_user(rt)
    users_before = ids(rt, users_table.c.id)

    # When
    report = retention.purge(rt)

    # Then
    assert not report.skipped
    assert ids(rt, sessions_table.c.request_id) == kept_sessions
    assert ids(rt, outbox_table.c.id) == kept_events
    with rt.db() as db:
        left = db.execute(
            select(deliveries_table.c.outbox_id, deliveries_table.c.state).order_by(
                deliveries_table.c.id
            )
        ).all()
    assert sorted(left) == sorted(
        [(max(kept_events), "failed"), (sorted(kept_events)[-2], "pending")]
    )
    assert (report.sessions, report.deliveries, report.outbox) == (
        len(gone_sessions),
        3,
        len(gone_events),
    )
    assert ids(rt, users_table.c.id) == users_before
    with rt.db() as db:
        assert tokens.get_user(db, rt.cipher, client_user) is not None


def test_retention_works_through_more_rows_than_one_batch(rt: Runtime, redis_client) -> None:
    """Many more old rows than one batch are all deleted, batch after batch, and the new
    ones between them kept."""
    old = [add_session(rt, "succeeded", OLD) for _ in range(23)]
    new = {add_session(rt, "failed", NEW) for _ in range(5)}
    events = [add_event(rt, OLD, ("delivered", OLD)) for _ in range(11)]
    batches: list[int] = []

    deleted = retention.purge_table(
        rt.db,
        sessions_table,
        retention.finished_sessions(OLD + timedelta(seconds=1)),
        4,
        lambda: batches.append(1),
    )
    report = retention.purge(rt, batch=4)

    assert deleted == len(old) and len(batches) == 6  # 23 rows, 4 a batch
    assert report.sessions == 0 and report.deliveries == len(events) == report.outbox
    assert ids(rt, sessions_table.c.request_id) == new
    assert ids(rt, outbox_table.c.id) == set()


def test_two_runs_at_once_neither_double_delete_nor_fail(rt: Runtime, redis_client) -> None:
    """Two purges over the same rows at once (the lock bypassed) delete each row once between
    them, without an error; with the lock, a second run skips."""
    for _ in range(40):
        add_session(rt, "succeeded", OLD)
    cutoff = retention.finished_sessions(T - timedelta(seconds=RETENTION_S))
    counts: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait()
            counts.append(retention.purge_table(rt.db, sessions_table, cutoff, 3))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sum(counts) == 40
    with rt.db() as db:
        assert db.scalar(select(func.count()).select_from(sessions_table)) == 0

    # A run while another holds the lock does nothing and says so.
    add_session(rt, "failed", OLD)
    with held_or_skip(rt.redis, RETENTION_LOCK, timeout=30) as lock:
        assert lock is not None
        assert retention.purge(rt).skipped
    assert len(ids(rt, sessions_table.c.request_id)) == 1
    assert retention.purge(rt).sessions == 1


def test_beat_runs_retention_every_interval(make_settings: Callable[..., Settings]) -> None:
    """Beat's schedule has the retention job at HUMANCONNECT_RETENTION_INTERVAL_S."""
    settings = make_settings(HUMANCONNECT_RETENTION_INTERVAL_S="120")
    entry = celery_config(settings)["beat_schedule"]["purge-expired"]
    assert entry["task"] == RETENTION_TASK and entry["schedule"] == 120


def test_failed_retry_still_works_within_the_retention_window(rt: Runtime, redis_client) -> None:
    """A transient failure younger than the retention period survives a run and is re-queued
    by `humanconnect failed --retry`; one older than it is gone."""
    from sqlalchemy import update

    from humanconnect.jobs.failures import requeue_transient

    young, old = add_session(rt, "failed", NEW), add_session(rt, "failed", OLD)
    with rt.db() as db:
        db.execute(
            update(sessions_table)
            .where(sessions_table.c.request_id.in_([young, old]))
            .values(error_kind="transient", sealed_session_token=rt.cipher.seal("a-token"))
        )
        db.commit()

    retention.purge(rt)
    sent: list[ExchangeRequest] = []
    queued = requeue_transient(rt, sent.append)

    assert queued == 1 and [r.request_id for r in sent] == [young]
    assert ids(rt, sessions_table.c.request_id) == {young}
