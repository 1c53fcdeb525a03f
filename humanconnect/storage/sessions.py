"""The `sessions` table: the durable idempotency record of each session, and every statement
that reads or moves it. The worker, the web's status fallback and `humanconnect failed` all
come through here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from humanconnect.clock import now, now_us, timestamp, to_us
from humanconnect.errors import HumanConnectError
from humanconnect.states import ErrorKind, RequestState
from humanconnect.storage.models import SessionRecord, sessions_table


class MissingSession(HumanConnectError):
    """Raised when a session's record is gone while a delivery is working on it."""


# Statements of the hot path, built once (values come as parameters) and run on the
# session's Core connection: nothing in the ORM session holds these rows, and the ORM's
# execute path cost more CPU than the statements themselves.
_MARK_SUCCEEDED = (
    update(sessions_table)
    .where(
        sessions_table.c.session_hash == bindparam("key"),
        sessions_table.c.state != RequestState.SUCCEEDED,
    )
    .values(
        state=RequestState.SUCCEEDED,
        human_id=bindparam("human_id"),
        client_user_id=bindparam("client_user_id"),
        error=None,
        error_kind=None,
        sealed_session_token=None,
        updated_at=bindparam("now"),
    )
)


@lru_cache(maxsize=4)
def _create(dialect: str) -> Any:
    """INSERT … ON CONFLICT DO NOTHING RETURNING, built once per dialect."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = sessions_table
    return (
        insert(table)
        .on_conflict_do_nothing(index_elements=[table.c.session_hash])
        .returning(table.c.session_hash)
    )


def load_or_create(
    db: Session,
    *,
    key: str,
    request_id: str,
    human_id: str,
    received_us: int,
    sealed_session_token: str,
    expected_client_user_id: str | None = None,
    connected_sources: str = "",
) -> tuple[SessionRecord, bool]:
    """The session's record, and whether this call created it. A first delivery creates it
    already `running` with one attempt, in one statement (a race-free insert); a later one
    reads what is there."""
    stamp = now()
    values = {
        "session_hash": key,
        "request_id": request_id,
        "human_id": human_id,
        "received_us": received_us,
        "state": RequestState.RUNNING,
        "attempts": 1,
        "sealed_session_token": sealed_session_token,
        "expected_client_user_id": expected_client_user_id,
        "connected_sources": connected_sources or None,
        "ambiguous": False,
        "created_at": stamp,
        "updated_at": stamp,
    }
    created = db.connection().execute(_create(db.get_bind().dialect.name), values).first()
    if created is not None:
        # What the row holds, without reading it back.
        return SessionRecord(**values), True
    row = db.get(SessionRecord, key, populate_existing=True)
    if row is None:
        raise MissingSession(f"session record vanished request={request_id}")
    return row, False


def attempt_under_way(row: SessionRecord, lock_s: float) -> bool:
    """Whether the record says another delivery began within a lock's term. The session lock
    keeps two deliveries apart, but a Redis restarted from its append-only file may have lost
    that lock while bringing the message back: for a token that can be fetched again (an
    access finish's), the record is asked as well. A delivery that died frees it once the
    term has passed."""
    if row.state != RequestState.RUNNING:
        return False
    return now_us() - to_us(timestamp(row.updated_at)) < to_us(lock_s)


def begin_attempt(row: SessionRecord) -> None:
    """Another delivery starts on an unfinished session."""
    row.state = RequestState.RUNNING
    row.attempts += 1
    row.updated_at = now()


def mark_succeeded(db: Session, key: str, client_user_id: str, human_id: str) -> bool:
    """Mark the session succeeded in the caller's transaction, with the humanId it was for (an
    access finish learns it only now); False when it already was (an earlier attempt's COMMIT
    landed although its connection broke)."""
    result = db.connection().execute(
        _MARK_SUCCEEDED,
        {"key": key, "client_user_id": client_user_id, "human_id": human_id, "now": now()},
    )
    return bool(result.rowcount)


def locked(db: Session, key: str) -> SessionRecord:
    """The session's record, locked for update until the caller's transaction ends."""
    row = db.get(SessionRecord, key, with_for_update=True)
    if row is None:
        raise MissingSession("session record vanished")
    return row


def mark_failed(row: SessionRecord, reason: str, kind: ErrorKind) -> None:
    row.state = RequestState.FAILED
    row.error = reason
    row.error_kind = kind
    row.updated_at = now()


def mark_retrying(db: Session, key: str, reason: str, ambiguous: bool) -> None:
    """Record a transient failure before the task re-queues itself; commits."""
    row = db.get(SessionRecord, key)
    if row is None:
        raise MissingSession("session record vanished")
    row.state = RequestState.RETRYING
    row.ambiguous = row.ambiguous or ambiguous
    row.error = reason
    row.error_kind = None
    row.updated_at = now()
    db.commit()


def pause_running(db: Session, key: str, reason: str) -> None:
    """A `running` session stopped by an outage of our own is `retrying`; any other state is
    left alone (a success committed before the outage stays one). Commits."""
    db.execute(
        update(sessions_table)
        .where(
            sessions_table.c.session_hash == key,
            sessions_table.c.state == RequestState.RUNNING,
        )
        .values(state=RequestState.RETRYING, error=reason, updated_at=now())
    )
    db.commit()


def by_request(db: Session, request_id: str) -> SessionRecord | None:
    """The session a finish request created, if a worker has seen it."""
    return db.scalar(select(SessionRecord).where(SessionRecord.request_id == request_id))


def failed(db: Session, limit: int) -> list[SessionRecord]:
    """Failed sessions, newest first."""
    query = (
        select(SessionRecord)
        .where(SessionRecord.state == RequestState.FAILED)
        .order_by(SessionRecord.updated_at.desc())
        .limit(limit)
    )
    return list(db.scalars(query).all())


def transient_failures(db: Session) -> list[SessionRecord]:
    """Sessions failed because the upstream was away for their whole retry window."""
    query = select(SessionRecord).where(
        SessionRecord.state == RequestState.FAILED, SessionRecord.error_kind == ErrorKind.TRANSIENT
    )
    return list(db.scalars(query).all())


def requeue(row: SessionRecord) -> None:
    """An operator sends a failed session round again."""
    row.state = RequestState.QUEUED
    row.error = None
    row.error_kind = None
    row.updated_at = now()
