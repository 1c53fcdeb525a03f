"""Delivery records: one per (event, endpoint), written in the event's own transaction, so
a committed event always has its deliveries, whatever crashes after.

A dispatcher *claims* due deliveries (counting the attempt and pushing `due_us` past a lease),
sends them, then *settles* them: delivered, due again per the schedule, or failed. A claim
whose dispatcher died is due again when its lease ends: at least once, never lost.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from humanconnect.clock import now, now_us, to_us
from humanconnect.settings import Settings
from humanconnect.storage.models import deliveries_table as T
from humanconnect.storage.models import outbox_table

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
#: Each wait is spread by up to this share either way, so failures don't retry in lockstep.
JITTER = 0.1
RESPONSE_CHARS = 200


@dataclass(frozen=True)
class Due:
    """A claimed delivery, with its event."""

    id: int
    endpoint: str
    #: Attempts started, this one included.
    attempts: int
    event_id: str
    #: The event's fields as stored in the outbox (a JSON object).
    fields: str
    created_at: datetime


@dataclass(frozen=True)
class Result:
    """What one attempt got."""

    delivered: bool
    status: int | None = None
    error: str | None = None
    response: str | None = None

    @property
    def gone(self) -> bool:
        """`410 Gone`: the receiver asks us to stop; the delivery fails at once."""
        return self.status == 410


def endpoint_digest(url: str) -> str:
    """A short name for an endpoint that reveals nothing of its URL (for Redis keys and
    messages: a URL may carry a credential)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Targets:
    """Where a process's events go: the endpoints, and the wait before the first attempt."""

    endpoints: tuple[str, ...] = ()
    first_wait_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Targets:
        schedule = settings.webhook_retry_schedule
        return cls(tuple(settings.webhook_urls), schedule[0] if schedule else 0.0)


NOWHERE = Targets()


def add(db: Session, outbox_ids: Sequence[int], targets: Targets) -> None:
    """One pending delivery per event and endpoint, in the caller's transaction."""
    if not outbox_ids or not targets.endpoints:
        return
    stamp = now()
    due = to_us(stamp.timestamp() + targets.first_wait_s)
    rows = [
        {
            "outbox_id": oid,
            "endpoint": url,
            "state": PENDING,
            "attempts": 0,
            "due_us": due,
            "created_at": stamp,
        }
        for oid in outbox_ids
        for url in targets.endpoints
    ]
    db.connection().execute(insert(T), rows)


def next_wait(
    schedule: Sequence[float], attempts: int, rng: random.Random | None = None
) -> float | None:
    """The jittered wait before attempt number `attempts + 1`, or None when the schedule
    allows no more (`schedule[i]` is the wait before attempt i + 1)."""
    if attempts >= len(schedule):
        return None
    base = schedule[attempts]
    return max(0.0, base * (1 + (rng or random).uniform(-JITTER, JITTER)))


def claim(db: Session, endpoint: str, *, limit: int, lease_s: float) -> list[Due]:
    """Take up to `limit` due deliveries of `endpoint`, oldest due first, and commit: each
    counts one more attempt and is not due again until `lease_s` from now.

    One UPDATE … RETURNING picks and leases them: a write from its first step, so SQLite
    queues it behind other writers (its busy timeout) where a read followed by a write would
    fail at once once the exchanges have written in between."""
    at = now_us()
    due = (
        select(T.c.id)
        .where(T.c.endpoint == endpoint, T.c.state == PENDING, T.c.due_us <= at)
        .order_by(T.c.due_us)
        .limit(limit)
    )
    if db.get_bind().dialect.name == "postgresql":
        # Two dispatchers (a lock lost with a Redis restart) never take the same rows.
        due = due.with_for_update(skip_locked=True)
    leased = db.execute(
        update(T)
        .where(T.c.id.in_(due.scalar_subquery()))
        .values(due_us=at + to_us(lease_s), attempts=T.c.attempts + 1)
        .returning(T.c.id, T.c.outbox_id, T.c.attempts, T.c.created_at)
    ).all()
    if not leased:
        db.rollback()
        return []
    events = {
        r.id: r
        for r in db.execute(
            select(outbox_table.c.id, outbox_table.c.event_id, outbox_table.c.fields).where(
                outbox_table.c.id.in_([r.outbox_id for r in leased])
            )
        ).all()
    }
    db.commit()
    picked = [
        Due(
            r.id,
            endpoint,
            r.attempts,
            events[r.outbox_id].event_id,
            events[r.outbox_id].fields,
            r.created_at,
        )
        for r in leased
    ]
    return sorted(picked, key=lambda d: d.id)


def settle(
    db: Session, outcomes: Iterable[tuple[Due, Result]], schedule: Sequence[float]
) -> Counter[str]:
    """Record each attempt's outcome in one transaction; counts delivered, retrying, failed."""
    stamp = now()
    at = to_us(stamp.timestamp())
    counts: Counter[str] = Counter()
    params = []
    for due, result in outcomes:
        wait = None if result.delivered or result.gone else next_wait(schedule, due.attempts)
        if result.delivered:
            state, outcome, due_us, finished = DELIVERED, "delivered", at, stamp
        elif wait is None:
            state, outcome, due_us, finished = FAILED, "failed", at, stamp
        else:
            state, outcome, due_us, finished = PENDING, "retrying", at + to_us(wait), None
        counts[outcome] += 1
        params.append(
            {
                "b_id": due.id,
                "b_state": state,
                "b_due": due_us,
                "b_finished": finished,
                "b_status": result.status,
                "b_error": result.error[:200] if result.error else None,
                "b_response": result.response[:RESPONSE_CHARS] if result.response else None,
            }
        )
    if params:
        db.connection().execute(
            update(T)
            .where(T.c.id == bindparam("b_id"))
            .values(
                state=bindparam("b_state"),
                due_us=bindparam("b_due"),
                finished_at=bindparam("b_finished"),
                last_status=bindparam("b_status"),
                last_error=bindparam("b_error"),
                last_response=bindparam("b_response"),
            ),
            params,
        )
    db.commit()
    return counts


def backlog(db: Session) -> dict[str, int]:
    """Pending deliveries per endpoint."""
    rows = db.execute(
        select(T.c.endpoint, func.count()).where(T.c.state == PENDING).group_by(T.c.endpoint)
    ).all()
    return {endpoint: int(n) for endpoint, n in rows}


@dataclass(frozen=True)
class Listed:
    id: int
    event_id: str
    type: str
    endpoint: str
    state: str
    attempts: int
    due_us: int
    created_at: datetime
    last_status: int | None
    last_error: str | None
    last_response: str | None


def listing(db: Session, *, failed_only: bool = False, limit: int = 200) -> list[Listed]:
    """The newest deliveries (failed ones only, if asked), newest first."""
    query = (
        select(T, outbox_table.c.event_id, outbox_table.c.fields)
        .join(outbox_table, outbox_table.c.id == T.c.outbox_id)
        .order_by(T.c.id.desc())
        .limit(limit)
    )
    if failed_only:
        query = query.where(T.c.state == FAILED)
    return [
        Listed(
            r.id,
            r.event_id,
            json.loads(r.fields).get("type", ""),
            r.endpoint,
            r.state,
            r.attempts,
            r.due_us,
            r.created_at,
            r.last_status,
            r.last_error,
            r.last_response,
        )
        for r in db.execute(query).all()
    ]


def retry(db: Session, *, failed_only: bool, since: datetime | None = None) -> int:
    """Make deliveries due now with a fresh schedule: the failed ones, and unless
    `failed_only` the pending ones too (a receiver that is back). Returns how many."""
    states = [FAILED] if failed_only else [FAILED, PENDING]
    query = update(T).where(T.c.state.in_(states))
    if since is not None:
        query = query.where(T.c.created_at >= since)
    statement = query.values(state=PENDING, attempts=0, due_us=now_us(), finished_at=None)
    result = cast(CursorResult[Any], db.connection().execute(statement))
    db.commit()
    return int(result.rowcount or 0)
