"""Erasing a user: everything the service keeps that names them, in the database and in
Redis, in one call; and the marks that keep a session in flight from bringing them back.

What names a user: their tokens row; their sessions (those that stored their tokens, those a
connect ticket vouched for them, those of their humanId), each with its sealed session
token; the outbox events and webhook deliveries carrying their clientUserId or humanId; the
Redis status records, claims and event-stream entries of those sessions.

A finish of theirs may still be queued, or its exchange running, when they are erased. The
erasure leaves marks (digests of their clientUserId and humanId, and when it happened by
Redis's clock, the clock that stamps each finish's receive time); a worker that meets a
session received before such a mark ends it `failed` (`erased`) and stores nothing. On
PostgreSQL the erasure and a worker's store of the same user take one advisory lock, so
neither runs half-way through the other; SQLite runs one writer at a time anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import bindparam, delete, func, or_, select, text
from sqlalchemy.orm import Session

from humanconnect import events, metrics, status_records
from humanconnect.clock import redis_us
from humanconnect.errors import HumanConnectError
from humanconnect.redis_clients import as_text
from humanconnect.redis_keys import access_claim, connect_token, request_status, session_claim
from humanconnect.request import Job
from humanconnect.runtime import Runtime
from humanconnect.states import ErrorKind, RequestState
from humanconnect.storage.models import Erasure, OutboxEvent, SessionRecord, User, WebhookDelivery

log = logging.getLogger(__name__)

#: What a finish of an erased user ends with, in its status record.
ERASED_ERROR = "the user was erased: nothing of this finish was stored"
#: Marks older than this are dropped: no session received before one is delivered this late
#: (a retry window is hours, not a week).
KEEP_MARKS_S = 7 * 24 * 3600
#: Redis keys and stream entries looked at per round trip while searching.
SCAN_BATCH = 1000


class ErasedMeanwhile(HumanConnectError):
    """The user of a session in flight was erased: its outcome must not be stored."""


@dataclass
class Erased:
    """What one erasure removed."""

    client_user_id: str
    human_ids: set[str]
    request_ids: set[str] = field(default_factory=set)
    session_hashes: set[str] = field(default_factory=set)
    tokens: int = 0
    sessions: int = 0
    events: int = 0
    redis_keys: int = 0


def mark(identifier: str) -> str:
    """An erasure mark's key: a digest, so the mark keeps no id of the person it is for."""
    return hashlib.blake2b(b"erased:" + identifier.encode(), digest_size=16).hexdigest()


def serialize(db: Session, client_user_id: str) -> None:
    """Hold, until the transaction ends, the lock that an erasure of this user and a store of
    their tokens both take (PostgreSQL; SQLite has one writer at a time)."""
    if db.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(client_user_id.encode(), digest_size=8).digest())
        db.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key - (1 << 63)})


#: How many marks one run of `marked`'s query names: an exchange's store names the most,
#: its clientUserId, the humanId answered and queued, and the ticket's clientUserId.
_MARKS = 4
#: `marked`'s query, built once with a fixed number of parameters: every exchange asks it
#: twice, and an IN over a list (building it anew, or an "expanding" parameter, which renders
#: the SQL again on every run) cost more CPU than running it.
_MARKED = (
    select(func.count())
    .select_from(Erasure)
    .where(
        Erasure.mark.in_([bindparam(f"m{i}", type_=Erasure.mark.type) for i in range(_MARKS)]),
        Erasure.erased_us >= bindparam("since"),
    )
)


def marked(db: Session, identifiers: Iterable[str | None], received_us: int) -> bool:
    """Whether any of these ids (clientUserId, humanId) was erased after `received_us`."""
    keys = list(dict.fromkeys(mark(i) for i in identifiers if i))
    # Core on the session's connection (same transaction): the ORM's execute path cost more
    # than the query (an exchange asks it twice).
    conn = db.connection()
    for start in range(0, len(keys), _MARKS):
        chunk = keys[start : start + _MARKS]
        # A short chunk fills the query's places by repeating its own marks.
        params: dict[str, object] = {f"m{i}": chunk[i % len(chunk)] for i in range(_MARKS)}
        params["since"] = received_us
        if conn.scalar(_MARKED, params):
            return True
    return False


def erased_since(rt: Runtime, job: Job) -> bool:
    """Whether the user of a finish was erased after it was received."""
    with rt.db() as db:
        return marked(db, (job.human_id, job.expected_client_user_id), job.received_us)


def end_finish(rt: Runtime, request_id: str, key: str) -> None:
    """End a finish of an erased user: no record of its session kept (`key`), its status
    saying why."""
    with rt.db() as db:
        db.execute(delete(SessionRecord).where(SessionRecord.session_hash == key))
        db.commit()
    end_status(rt.redis, request_id, status_records.ttl_for(rt.settings, RequestState.FAILED))
    metrics.inc(rt.redis, "exchanges", outcome=ErrorKind.ERASED)
    log.info("exchange ended, its user erased request=%s", request_id)


def erase(rt: Runtime, client_user_id: str) -> Erased | None:
    """Erase the user everywhere; None when the service holds nothing of them. Emits one
    `user.erased` event (and its webhooks). Raises a database or Redis error with the user
    still in the database (call again)."""
    redis_now = redis_us(rt.redis)
    with rt.db() as db:
        serialize(db, client_user_id)
        found = _theirs(db, client_user_id)
        if found is None:
            db.rollback()
            # Nothing stored, but a Connect token may be kept for them (opened, never
            # finished): it goes all the same.
            rt.redis.delete(connect_token(client_user_id), access_claim(client_user_id))
            return None
        _delete_rows(db, found)
        _leave_marks(db, found, redis_now)
        event = events.record(
            db,
            "user.erased",
            targets=rt.webhook_targets,
            clientUserId=client_user_id,
            humanId=found.primary_human_id,
        )
        # Redis before the commit: if either fails, the user is still in the database and
        # erasing again finishes the job (what Redis dropped meanwhile were copies of theirs).
        found.erased.redis_keys = _clean_redis(rt, found.erased, rt.settings.events_stream)
        db.commit()
    events.relay_now(rt, event)
    log.info(
        "user erased sessions=%d events=%d redis_keys=%d",
        found.erased.sessions,
        found.erased.events,
        found.erased.redis_keys,
    )
    return found.erased


@dataclass
class _Found:
    erased: Erased
    primary_human_id: str
    user: User | None


def _theirs(db: Session, client_user_id: str) -> _Found | None:
    user = db.scalar(select(User).where(User.client_user_id == client_user_id).with_for_update())
    human_ids = {user.human_id} if user is not None else set()
    rows = list(
        db.scalars(
            select(SessionRecord)
            .where(
                or_(
                    SessionRecord.client_user_id == client_user_id,
                    SessionRecord.expected_client_user_id == client_user_id,
                    SessionRecord.human_id.in_(human_ids),
                )
            )
            .with_for_update()
        ).all()
    )
    if user is None and not rows:
        return None
    # A session the ticket vouched for this user but whose upstream named someone else
    # holds that other person's humanId: it goes, their humanId is not marked.
    human_ids |= {r.human_id for r in rows if r.error_kind != ErrorKind.CLIENT_USER_MISMATCH}
    erased = Erased(
        client_user_id,
        human_ids,
        request_ids={r.request_id for r in rows},
        session_hashes={r.session_hash for r in rows},
    )
    primary = user.human_id if user is not None else sorted(human_ids or {rows[0].human_id})[0]
    return _Found(erased, primary, user)


def _delete_rows(db: Session, found: _Found) -> None:
    erased = found.erased
    if found.user is not None:
        db.delete(found.user)
        erased.tokens = 1
    if erased.session_hashes:
        db.execute(
            delete(SessionRecord).where(SessionRecord.session_hash.in_(erased.session_hashes))
        )
    erased.sessions = len(erased.session_hashes)
    ids = _naming_events(db, erased.client_user_id, erased.human_ids)
    if ids:
        db.execute(delete(WebhookDelivery).where(WebhookDelivery.outbox_id.in_(ids)))
        db.execute(delete(OutboxEvent).where(OutboxEvent.id.in_(ids)))
    erased.events = len(ids)
    db.flush()


def _naming_events(db: Session, client_user_id: str, human_ids: set[str]) -> list[int]:
    """The outbox rows whose event names the user: a text search for candidates, each then
    read as JSON (an id that merely contains another is not a match)."""
    needles = [json.dumps(i) for i in (client_user_id, *human_ids)]
    candidates = db.execute(
        select(OutboxEvent.id, OutboxEvent.fields).where(
            or_(*(OutboxEvent.fields.contains(n, autoescape=True) for n in needles))
        )
    ).all()
    return [
        row_id
        for row_id, fields in candidates
        if _names(json.loads(fields), client_user_id, human_ids)
    ]


def _names(body: dict[str, Any], client_user_id: str, human_ids: set[str]) -> bool:
    return body.get("clientUserId") == client_user_id or body.get("humanId") in human_ids


def _leave_marks(db: Session, found: _Found, erased_us: int) -> None:
    keys = {mark(i) for i in (found.erased.client_user_id, *found.erased.human_ids)}
    db.execute(delete(Erasure).where(Erasure.mark.in_(keys)))
    db.execute(delete(Erasure).where(Erasure.erased_us < erased_us - KEEP_MARKS_S * 1_000_000))
    db.add_all(Erasure(mark=k, erased_us=erased_us) for k in keys)


def _clean_redis(rt: Runtime, erased: Erased, stream: str) -> int:
    """Their status records, claims and stream entries: those of the sessions the database
    had, and those of finishes still queued that no worker has recorded yet (found by their
    humanId). A queued one's record is left saying it ended `erased`, without the humanId:
    its worker ends it so when it comes to it. Returns the keys and entries removed."""
    r = rt.redis
    removed = 0
    pipe = r.pipeline(transaction=False)
    for request_id in erased.request_ids:
        pipe.delete(request_status(request_id))
    for key in erased.session_hashes:
        pipe.delete(session_claim(key))
    # The current flow's: a finish claim to coalesce into, a Connect token kept for them.
    pipe.delete(access_claim(erased.client_user_id), connect_token(erased.client_user_id))
    removed += sum(int(n) for n in pipe.execute())
    for request_id in _records_of(r, erased.human_ids):
        end_status(r, request_id, status_records.ttl_for(rt.settings, RequestState.FAILED))
        removed += 1
    removed += _delete_matching(r, session_claim("*"), erased.human_ids)
    removed += _delete_stream_entries(r, stream, erased.client_user_id, erased.human_ids)
    return removed


def end_status(r: redis.Redis, request_id: str, ttl_s: int) -> None:
    """A request of an erased user: its record says `failed`, why, and nothing of them."""
    pipe = r.pipeline(transaction=False)
    pipe.delete(request_status(request_id))  # every field it had, the humanId first
    status_records.queue_state(pipe, request_id, RequestState.FAILED, ttl_s, error=ERASED_ERROR)
    pipe.execute()


def _scan(r: redis.Redis, pattern: str) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for key in r.scan_iter(pattern, count=SCAN_BATCH):
        batch.append(key)
        if len(batch) == SCAN_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _records_of(r: redis.Redis, human_ids: set[str]) -> list[str]:
    """The request ids whose status record names one of `human_ids`."""
    prefix = request_status("")
    found = []
    for keys in _scan(r, request_status("*")):
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "humanId")
        for key, human in zip(keys, pipe.execute(), strict=True):
            if human is not None and as_text(human) in human_ids:
                found.append(as_text(key)[len(prefix) :])
    return found


def _delete_matching(r: redis.Redis, pattern: str, human_ids: set[str]) -> int:
    """Delete the claims that name one of `human_ids` (by the digest a claim keeps)."""
    removed = 0
    digests = {status_records.human_digest(h) for h in human_ids}
    for keys in _scan(r, pattern):
        values = r.mget(keys)
        doomed = [
            k
            for k, v in zip(keys, values, strict=True)
            if v is not None and status_records.read_claim(v).human_digest in digests
        ]
        if doomed:
            removed += int(r.delete(*doomed))
    return removed


def _delete_stream_entries(
    r: redis.Redis, stream: str, client_user_id: str, human_ids: set[str]
) -> int:
    removed = 0
    start = "-"
    while True:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = r.xrange(  # type: ignore[assignment]
            stream, min=start, count=SCAN_BATCH
        )
        if not entries:
            return removed
        doomed = [
            entry_id
            for entry_id, fields in entries
            if _names(
                {as_text(k): as_text(v) for k, v in fields.items()}, client_user_id, human_ids
            )
        ]
        if doomed:
            removed += int(r.xdel(stream, *doomed))
        if len(entries) < SCAN_BATCH:
            return removed
        start = "(" + as_text(entries[-1][0])
