"""Completion events through an outbox: written in the transaction of the change they report,
relayed to the Redis Stream afterwards, marked sent only once Redis took them.

A relay that dies between XADD and the mark sends the same entry again, with the same
`eventId`: consumers dedupe on it.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from humanconnect import metrics, tracing
from humanconnect.clock import now, timestamp
from humanconnect.storage.models import OutboxEvent, outbox_table
from humanconnect.webhooks import deliveries

if TYPE_CHECKING:
    from humanconnect.runtime import Runtime

log = logging.getLogger(__name__)

TYPES = ("connect.completed", "connect.failed", "publictoken.repaired", "user.erased")
# Never in an event, whatever a caller passes.
FORBIDDEN = frozenset({"accessToken", "publicToken", "sessionToken", "clientSecret"})
# The stream keeps about this many entries (approximate trimming, cheap for Redis).
STREAM_MAXLEN = 100_000
# The sweep leaves younger events to the worker that wrote them (no double relay).
SWEEP_GRACE_S = 5.0


_INSERT_ONE = insert(outbox_table).returning(outbox_table.c.id)


def _row(type_: str, fields: dict[str, str], stamp: datetime) -> dict[str, object]:
    if type_ not in TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    leaked = FORBIDDEN & fields.keys()
    if leaked:
        raise ValueError(f"events never carry {sorted(leaked)}")
    event_id = str(uuid.uuid4())
    body = {"type": type_, "eventId": event_id, "occurredAt": stamp.isoformat(), **fields}
    # With tracing on, the finish's trace, for a later relay or webhook attempt (not sent).
    body.update(tracing.carrier())
    return {"event_id": event_id, "fields": json.dumps(body), "created_at": stamp}


def record(
    db: Session, type_: str, *, targets: deliveries.Targets = deliveries.NOWHERE, **fields: str
) -> OutboxEvent:
    """Add an event, and its webhook deliveries to `targets`, to the current transaction; it
    is relayed and delivered only if that commits.

    One Core INSERT … RETURNING, not the ORM's unit of work (flushing this one row through
    the ORM is a large share of an exchange's CPU); the returned object is detached, for the
    relay."""
    row = _row(type_, fields, now())
    outbox_id = db.connection().execute(_INSERT_ONE, row).scalar_one()
    deliveries.add(db, [outbox_id], targets)
    return OutboxEvent(id=outbox_id, **row)


def record_many(
    db: Session,
    type_: str,
    many: Sequence[dict[str, str]],
    targets: deliveries.Targets = deliveries.NOWHERE,
) -> list[int]:
    """Add one event per item in one statement, and their deliveries; returns outbox ids."""
    if not many:
        return []
    stamp = now()
    rows = [_row(type_, fields, stamp) for fields in many]
    ids = list(db.scalars(insert(OutboxEvent).returning(OutboxEvent.id), rows).all())
    deliveries.add(db, ids, targets)
    return ids


#: (replicas, timeout in ms) a relay waits for before it counts events sent; (0, 0): none.
NO_WAIT = (0, 0)
#: Seconds since a replica's last acknowledgement past which it no longer counts as keeping
#: up: replicas acknowledge every second, so a healthy one shows 0 or 1.
REPLICA_LAG_S = 2


def _send(
    db: Session,
    r: redis.Redis,
    stream: str,
    events: Sequence[OutboxEvent],
    wait: tuple[int, int] = NO_WAIT,
) -> int:
    if not events:
        return 0
    pipe = r.pipeline(transaction=False)
    queue_xadd(pipe, stream, events)
    if wait[0]:
        # Sent once the replicas hold them (HUMANCONNECT_REDIS_MIN_REPLICAS): a failover
        # right after must not take them away. Fewer in time: the next sweep sends again.
        pipe.execute_command("WAIT", *wait)
    replies = pipe.execute()
    if wait[0] and replies[-1] < wait[0]:
        log.warning("%d relayed events not yet on enough replicas: left for the sweep", len(events))
        return 0
    mark_sent(db, [e.id for e in events])
    return len(events)


def relay_now(rt: Runtime, event: OutboxEvent) -> None:
    """Send an event its caller just committed, and count it; with Redis or the database
    away, the sweep sends it later."""
    try:
        with rt.db() as db:
            sent = relay_committed(
                db, rt.redis, rt.settings.events_stream, event, rt.settings.replica_wait
            )
        metrics.inc(rt.redis, "events", sent)
    except (redis.exceptions.RedisError, OperationalError) as exc:
        log.warning("event left for the sweep: %s", type(exc).__name__)


def payload(fields: str) -> tuple[dict[str, Any], str | None]:
    """An outbox row's event as it is sent (stream, webhooks), and the traceparent of the
    finish that wrote it, which is stored beside it and never sent."""
    event = json.loads(fields)
    return event, event.pop(tracing.CONTEXT_FIELD, None)


def queue_xadd(pipe: Any, stream: str, events: Sequence[OutboxEvent]) -> None:
    """The stream entries for `events`, added to a pipeline the caller executes; call
    `mark_sent` once it has."""
    for event in events:
        pipe.xadd(stream, payload(event.fields)[0], maxlen=STREAM_MAXLEN, approximate=True)


def mark_sent(db: Session, ids: Sequence[int]) -> None:
    """Only now, with Redis holding them, are they sent."""
    db.execute(update(OutboxEvent).where(OutboxEvent.id.in_(ids)).values(sent_at=now()))
    db.commit()


class SentMarks:
    """Marks relayed events sent a batch at a time: one UPDATE every `delay_s` instead of a
    transaction per exchange (a commit per exchange is a noticeable share of its CPU).

    Marks not yet written when the process dies, or when the database refuses them, leave
    their events to the sweep, which sends them again with the same eventIds (the contract
    allows a resend). `delay_s` stays well under SWEEP_GRACE_S so that only happens then.
    """

    def __init__(self, db: Callable[[], Any], delay_s: float = 0.5):
        self.db = db
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._timer: threading.Timer | None = None

    def add(self, ids: Sequence[int]) -> None:
        """Mark `ids` sent within `delay_s`."""
        with self._lock:
            self._ids.extend(ids)
            if self._timer is None:
                self._timer = threading.Timer(self.delay_s, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Write the marks now (the timer's call, and at shutdown)."""
        with self._lock:
            ids, self._ids = self._ids, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if not ids:
            return
        try:
            with self.db() as db:
                mark_sent(db, ids)
        except SQLAlchemyError as exc:
            log.warning("%d relayed events left for the sweep: %s", len(ids), type(exc).__name__)


def relay_ids(
    db: Session, r: redis.Redis, stream: str, ids: Sequence[int], wait: tuple[int, int] = NO_WAIT
) -> int:
    """Relay the given events (the ones this process just committed)."""
    events = db.scalars(
        select(OutboxEvent).where(OutboxEvent.id.in_(ids), OutboxEvent.sent_at.is_(None))
    ).all()
    return _send(db, r, stream, events, wait)


def relay_committed(
    db: Session, r: redis.Redis, stream: str, event: OutboxEvent, wait: tuple[int, int] = NO_WAIT
) -> int:
    """Relay an event this process just committed, from the row it holds (no read back)."""
    return _send(db, r, stream, [event], wait)


def relay_pending(
    db: Session,
    r: redis.Redis,
    stream: str,
    limit: int = 500,
    grace_s: float = SWEEP_GRACE_S,
    wait: tuple[int, int] = NO_WAIT,
) -> int:
    """Relay up to `limit` unsent events older than `grace_s`, oldest first; none while
    fewer replicas keep up than `wait` asks for (each round would add its whole batch to the
    stream again, only for the WAIT to fail)."""
    if wait[0] and replicas_keeping_up(r) < wait[0]:
        log.warning("outbox sweep skipped: fewer than %d replicas keep up", wait[0])
        return 0
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
    events = [e for e in db.scalars(query).all() if timestamp(e.created_at) <= cutoff]
    if not events:
        return 0
    # Later and in a batch: linked to each event's finish, not a part of one.
    with tracing.relay(payload(e.fields)[1] for e in events):
        return _send(db, r, stream, events, wait)


def replicas_keeping_up(r: redis.Redis) -> int:
    """The primary's replicas that are online and acknowledged within REPLICA_LAG_S: a
    frozen or cut-off one stays connected for a while, but its acknowledgements stop."""
    info = r.info("replication")
    return sum(
        1
        for name, replica in info.items()
        if name.startswith("slave")
        and isinstance(replica, dict)
        and replica.get("state") == "online"
        and int(replica.get("lag", REPLICA_LAG_S + 1)) <= REPLICA_LAG_S
    )


def backlog(db: Session) -> int:
    """How many events wait for the relay."""
    return int(db.scalar(select(func.count()).where(OutboxEvent.sent_at.is_(None))) or 0)
