"""Completion events through an outbox: written in the transaction of the change they report,
relayed to the Redis Stream afterwards, marked sent only once Redis took them.

A relay that dies between XADD and the mark sends the same entry again, with the same
`eventId`: consumers dedupe on it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session as DbSession

from worker.clock import now
from worker.models import OutboxEvent

log = logging.getLogger(__name__)

TYPES = ("connect.completed", "connect.failed", "publictoken.repaired")
# Never in an event, whatever a caller passes.
FORBIDDEN = frozenset({"accessToken", "publicToken", "sessionToken", "clientSecret"})
# The stream keeps about this many entries (approximate trimming, cheap for Redis).
STREAM_MAXLEN = 100_000
# The sweep leaves younger events to the worker that wrote them (no double relay).
SWEEP_GRACE_S = 5.0


def _row(type_: str, fields: dict[str, str], stamp: datetime) -> dict[str, object]:
    if type_ not in TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    leaked = FORBIDDEN & fields.keys()
    if leaked:
        raise ValueError(f"events never carry {sorted(leaked)}")
    event_id = str(uuid.uuid4())
    body = {"type": type_, "eventId": event_id, "occurredAt": stamp.isoformat(), **fields}
    return {"event_id": event_id, "fields": json.dumps(body), "created_at": stamp}


def record(db: DbSession, type_: str, **fields: str) -> OutboxEvent:
    """Add an event to the current transaction; it is relayed only if that commits."""
    event = OutboxEvent(**_row(type_, fields, now()))
    db.add(event)
    return event


def record_many(db: DbSession, type_: str, many: Sequence[dict[str, str]]) -> list[int]:
    """Add one event per item in one statement; returns their outbox ids."""
    if not many:
        return []
    stamp = now()
    rows = [_row(type_, fields, stamp) for fields in many]
    return list(db.scalars(insert(OutboxEvent).returning(OutboxEvent.id), rows).all())


def _send(db: DbSession, r: redis.Redis, stream: str, events: Sequence[OutboxEvent]) -> int:
    if not events:
        return 0
    pipe = r.pipeline(transaction=False)
    queue_xadd(pipe, stream, events)
    pipe.execute()
    mark_sent(db, events)
    return len(events)


def queue_xadd(pipe: Any, stream: str, events: Sequence[OutboxEvent]) -> None:
    """The stream entries for `events`, added to a pipeline the caller executes; call
    `mark_sent` once it has."""
    for event in events:
        pipe.xadd(stream, json.loads(event.fields), maxlen=STREAM_MAXLEN, approximate=True)


def mark_sent(db: DbSession, events: Sequence[OutboxEvent]) -> None:
    """Only now, with Redis holding them, are they sent."""
    db.execute(
        update(OutboxEvent).where(OutboxEvent.id.in_([e.id for e in events])).values(sent_at=now())
    )
    db.commit()


def relay_ids(db: DbSession, r: redis.Redis, stream: str, ids: Sequence[int]) -> int:
    """Relay the given events (the ones this process just committed)."""
    events = db.scalars(
        select(OutboxEvent).where(OutboxEvent.id.in_(ids), OutboxEvent.sent_at.is_(None))
    ).all()
    return _send(db, r, stream, events)


def relay_committed(db: DbSession, r: redis.Redis, stream: str, event: OutboxEvent) -> int:
    """Relay an event this process just committed, from the row it holds (no read back)."""
    return _send(db, r, stream, [event])


def relay_pending(
    db: DbSession, r: redis.Redis, stream: str, limit: int = 500, grace_s: float = SWEEP_GRACE_S
) -> int:
    """Relay up to `limit` unsent events older than `grace_s`, oldest first."""
    cutoff = now().timestamp() - grace_s
    query = (
        select(OutboxEvent)
        .where(OutboxEvent.sent_at.is_(None))
        .order_by(OutboxEvent.id)
        .limit(limit)
    )
    if db.get_bind().dialect.name == "postgresql":
        # Two sweepers never take the same rows.
        query = query.with_for_update(skip_locked=True)
    events = [e for e in db.scalars(query).all() if _utc_ts(e.created_at) <= cutoff]
    return _send(db, r, stream, events)


def _utc_ts(stamp: datetime) -> float:
    # SQLite hands back naive datetimes; everything we write is UTC.
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def backlog(db: DbSession) -> int:
    """How many events wait for the relay."""
    return int(db.scalar(select(func.count()).where(OutboxEvent.sent_at.is_(None))) or 0)
