"""Exchanging one session for tokens: the logic behind the `exchange_session` task.

Plain functions and one class, testable without Celery. The task only maps an `Outcome` to
"done" or "retry later".
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from redis.lock import Lock
from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session as DbSession
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_before_delay,
    wait_random_exponential,
)

from worker import events, metrics, status, store
from worker.breaker import Breaker
from worker.clock import now, now_us, to_us
from worker.crypto import Cipher, session_hash
from worker.errors import (
    CircuitOpen,
    PermanentUpstreamError,
    TransientUpstreamError,
    UpstreamError,
)
from worker.models import OutboxEvent, Session, User, sessions_table
from worker.retry import backoff, retry_cause, wait_honouring_retry_after
from worker.runtime import Runtime
from worker.upstream import Tokens, exchange_tokens

log = logging.getLogger(__name__)

# The session lock (Settings.session_lock_s, 90 s) is renewed before every upstream call and
# every store attempt, so it only has to outlast one of them; a killed worker's lock frees
# itself well before its message is redelivered (the broker's visibility timeout, 180 s).
#: How long the store step keeps trying through a database outage. The upstream has
#: consumed the session token by then: giving up would lose the user.
STORE_PATIENCE_S = 600.0
# Pause before looking again at a session another delivery is working on.
BUSY_COUNTDOWN_S = 5.0


@dataclass(frozen=True)
class Job:
    """One accepted finish, as the producer queued it (the session token already opened)."""

    request_id: str
    human_id: str
    client_id: str
    session_token: str
    received_us: int
    #: When the retry window opened: the receive time, or when an operator re-queued it.
    window_start_us: int | None = None

    def __repr__(self) -> str:
        return f"Job(request_id={self.request_id!r}, human_id={self.human_id!r})"


@dataclass(frozen=True)
class Outcome:
    """What a run ended with: a final state, or a pause before the next try."""

    state: str
    retry_in: float | None = None
    error: str | None = None
    upstream_calls: int = 0


class Exchanger:
    """Runs one delivery of a session to its end or to its next pause."""

    def __init__(self, rt: Runtime, acquire_slot: Callable[[], float]):
        self.rt = rt
        self.settings = rt.settings
        self.acquire_slot = acquire_slot
        self.breaker = Breaker(rt.redis)
        self.sent = events.SentMarks(rt.db)

    # -- the run -------------------------------------------------------------------------
    def run(self, job: Job, *, retries: int = 0) -> Outcome:
        """Exchange `job` unless it is already done or being done by another delivery."""
        key = session_hash(job.session_token)
        lock = SessionLock(self.rt.redis, f"hc:lock:session:{key}", self.settings.session_lock_s)
        if not lock.take(job, self.settings.status_ttl_s):
            return Outcome("busy", retry_in=BUSY_COUNTDOWN_S)
        try:
            return self._run_locked(job, key, lock, retries)
        finally:
            if lock.held:  # else released with the success's round trip
                try:
                    lock.release()
                except redis.exceptions.LockError:
                    # Expired and maybe taken by another delivery: it is theirs now.
                    log.warning("session lock expired before release request=%s", job.request_id)

    def _run_locked(self, job: Job, key: str, lock: SessionLock, retries: int) -> Outcome:
        start_us = job.window_start_us or job.received_us
        deadline_us = start_us + to_us(self.settings.retry_window_s)
        with self.rt.db() as db:
            row = _load_or_create(db, job, key, self.rt.cipher)
            first = row not in db  # created by this delivery: already running, one attempt
            finished = row.state in ("succeeded", "failed")
            # A run that died while `running` may have reached the upstream unanswered.
            ambiguous_before = not first and (
                row.ambiguous or (row.state == "running" and row.attempts > 0)
            )
            if not first and not finished:
                row.state = "running"
                row.attempts += 1
                row.updated_at = now()
            db.commit()
        if finished:
            # Outside that session: SQLite runs on one pooled connection per process.
            self._mirror_final(job, row)
            return Outcome(row.state, error=row.error)

        calls = 0
        ambiguous_now = False
        # Upstream latencies, recorded with the run's last Redis round trip.
        timings: list[float] = []

        def before_call() -> None:
            nonlocal calls
            stay_away = self.breaker.wait()
            if stay_away:
                # Jittered, so the queue doesn't come back all at once when it closes.
                raise CircuitOpen(
                    "upstream failing: calls paused",
                    retry_after=stay_away * (1 + random.random()),
                )
            self.acquire_slot()
            # A full lock term for this call: a slow run never lets a duplicate in.
            lock.renew()
            calls += 1

        def note(state: RetryCallState) -> None:
            nonlocal ambiguous_now
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, UpstreamError) and exc.ambiguous:
                ambiguous_now = True
            metrics.inc(self.rt.redis, "retries", cause=retry_cause(exc), where="inline")
            log.info(
                "upstream transient, retrying inline request=%s attempt=%d reason=%s",
                job.request_id,
                state.attempt_number,
                exc.reason if isinstance(exc, UpstreamError) else type(exc).__name__,
            )

        try:
            tokens = self._exchange_inline(job, before_call, note, timings)
        except PermanentUpstreamError as exc:
            self._observe(timings)
            lost = ambiguous_before or ambiguous_now
            return self._fail(job, key, exc.reason, "answer_lost" if lost else "permanent", calls)
        except TransientUpstreamError as exc:
            self._observe(timings)
            ambiguous_now = ambiguous_now or exc.ambiguous
            pause = backoff(
                retries,
                initial=self.settings.retry_initial_s * 4,
                cap=self.settings.retry_max_countdown_s,
                retry_after=exc.retry_after,
            )
            if now_us() + to_us(pause) > deadline_us:
                reason = f"upstream unavailable for the whole retry window: {exc.reason}"
                return self._fail(job, key, reason, "transient", calls)
            self._mark_retrying(job, key, exc.reason, ambiguous_now)
            metrics.inc(self.rt.redis, "retries", cause=retry_cause(exc), where="queue")
            return Outcome("retrying", retry_in=pause, error=exc.reason, upstream_calls=calls)

        try:
            applied, event = self._store(job, key, tokens, lock)
        except PermanentUpstreamError as exc:
            self._observe(timings)
            return self._fail(job, key, exc.reason, "permanent", calls)
        self._announce_success(job, tokens, event, timings, lock)
        log.info("exchange succeeded request=%s calls=%d newest=%s", job.request_id, calls, applied)
        return Outcome("succeeded", upstream_calls=calls)

    # -- steps ---------------------------------------------------------------------------
    def _exchange_inline(
        self,
        job: Job,
        before_call: Callable[[], None],
        note: Callable[[RetryCallState], None],
        timings: list[float],
    ) -> Tokens:
        """A few quick tries inside this run; longer outages go back to the queue."""
        s = self.settings
        secret = s.client_secret.get_secret_value() if s.client_secret else ""

        def call() -> Tokens:
            before_call()
            started = time.monotonic()
            try:
                return exchange_tokens(
                    s.base_url,
                    human_id=job.human_id,
                    client_id=job.client_id,
                    client_secret=secret,
                    session_token=job.session_token,
                    connect_timeout=s.connect_timeout_s,
                    read_timeout=s.read_timeout_s,
                )
            except TransientUpstreamError as exc:
                if exc.status is None or exc.status >= 500:
                    self._count_failure()
                raise
            finally:
                timings.append(time.monotonic() - started)

        retrying = Retrying(
            # An open breaker sends the run back to the queue at once.
            retry=retry_if_exception_type(TransientUpstreamError)
            & retry_if_not_exception_type(CircuitOpen),
            stop=stop_before_delay(s.retry_inline_budget_s) | stop_after_attempt(4),
            wait=wait_honouring_retry_after(s.retry_initial_s, s.retry_inline_budget_s),
            before_sleep=note,
            reraise=True,
        )
        return retrying(call)

    def _store(
        self, job: Job, key: str, tokens: Tokens, lock: SessionLock
    ) -> tuple[bool, OutboxEvent | None]:
        """Commit tokens and the session's success together, riding out a database outage;
        the event is None when an earlier attempt's commit turns out to have landed.

        The upstream has consumed the session token by now: giving up here would lose the
        user, so this step retries far longer than the others, renewing the lock each time.
        """
        for attempt in Retrying(
            retry=retry_if_exception_type((OperationalError, PoolTimeout)),
            stop=stop_after_delay(STORE_PATIENCE_S),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        ):
            _renew(lock)
            with attempt, self.rt.db() as db:
                # Only a session not yet succeeded: if a connection broke while an earlier
                # attempt's COMMIT was in flight, that commit may have landed, and its
                # event must stay the only one.
                marked = (
                    db.connection()
                    .execute(
                        _MARK_SUCCEEDED,
                        {"key": key, "client_user_id": tokens.client_user_id, "now": now()},
                    )
                    .rowcount
                )
                if not marked:
                    db.rollback()
                    log.info(
                        "store had landed before its connection broke request=%s", job.request_id
                    )
                    return False, None
                applied = store.save_tokens(
                    db,
                    self.rt.cipher,
                    human_id=tokens.human_id,
                    client_user_id=tokens.client_user_id,
                    access_token=tokens.access_token,
                    public_token=tokens.public_token,
                    received_us=job.received_us,
                    session_hash=key,
                )
                event = events.record(
                    db,
                    "connect.completed",
                    humanId=tokens.human_id,
                    clientUserId=tokens.client_user_id,
                    requestId=job.request_id,
                )
                db.commit()
                return applied, event
        raise AssertionError("unreachable")  # pragma: no cover

    def _fail(self, job: Job, key: str, reason: str, kind: str, calls: int) -> Outcome:
        if kind == "answer_lost":
            reason = (
                "the upstream refused the session after an earlier call got no answer: the "
                f"token was probably used and its answer lost ({reason}); ask the user to "
                "connect again"
            )
        with self.rt.db() as db:
            row = db.get(Session, key, with_for_update=True)
            assert row is not None
            stored = row.state == "succeeded"
            if not stored:
                row.state = "failed"
                row.error = reason
                row.error_kind = kind
                row.updated_at = now()
                event = events.record(
                    db,
                    "connect.failed",
                    humanId=job.human_id,
                    requestId=job.request_id,
                    error=reason,
                )
            db.commit()
        if stored:
            # A delivery whose lock had lapsed stored the tokens meanwhile: that stands.
            self._mirror_final(job, row)
            return Outcome("succeeded", upstream_calls=calls)
        self._relay(event)
        metrics.inc(self.rt.redis, "exchanges", outcome=kind)
        self._status(job, "failed", error=reason)
        log.warning("exchange failed request=%s kind=%s reason=%s", job.request_id, kind, reason)
        return Outcome("failed", error=reason, upstream_calls=calls)

    def fail_internal(self, job: Job, reason: str) -> None:
        """Record a failure that is ours, not the upstream's (retries of a bug ran out)."""
        key = session_hash(job.session_token)
        with self.rt.db() as db:
            row = db.get(Session, key)
            if row is not None and row.state in ("succeeded", "failed"):
                return
            if row is not None:
                row.state, row.error, row.error_kind = "failed", reason, "internal"
                row.updated_at = now()
            event = events.record(
                db, "connect.failed", humanId=job.human_id, requestId=job.request_id, error=reason
            )
            db.commit()
        self._relay(event)
        metrics.inc(self.rt.redis, "exchanges", outcome="internal")
        self._status(job, "failed", error=reason)

    def _count_failure(self) -> None:
        try:
            self.breaker.failure()
        except redis.exceptions.RedisError:
            pass  # the breaker is an optimisation: never let it fail an exchange

    def _observe(self, timings: list[float]) -> None:
        metrics.observe_many(self.rt.redis, "upstream_seconds", timings, endpoint="tokens")

    def _announce_success(
        self,
        job: Job,
        tokens: Tokens,
        event: OutboxEvent | None,
        timings: list[float],
        lock: SessionLock,
    ) -> None:
        """The event, the counters, the request's status and the lock's release in one
        Redis round trip, then
        the event marked sent (in a batch, within half a second). If Redis fails here the
        outbox sweep sends the event and the task's retry finds the session done and writes
        the status."""
        fields = {"clientUserId": tokens.client_user_id, "humanId": tokens.human_id}
        if tokens.public_token:
            fields["publicToken"] = self.rt.cipher.seal(tokens.public_token)
        # No MULTI: each command stands alone, and a transaction costs two more replies.
        pipe = self.rt.redis.pipeline(transaction=False)
        metrics.queue_observe(pipe, "upstream_seconds", timings, endpoint="tokens")
        if event is not None:  # else the landed attempt's event is in the outbox, for the sweep
            events.queue_xadd(pipe, self.settings.events_stream, [event])
            metrics.queue_inc(pipe, "events", 1)
        metrics.queue_inc(pipe, "exchanges", outcome="succeeded")
        Breaker.queue_success(pipe)
        status.queue_state(pipe, job.request_id, "succeeded", self.settings.status_ttl_s, **fields)
        token = lock.queue_release(pipe)
        try:
            released = pipe.execute()[-1]
        except redis.exceptions.RedisError:
            lock.local.token = token  # the run's own release tries again
            raise
        if not released:
            log.warning("session lock expired before release request=%s", job.request_id)
        if event is not None:
            self.sent.add([event.id])

    def _relay(self, event: OutboxEvent) -> None:
        """Send a just-committed event now; if Redis is away the sweep sends it later."""
        try:
            with self.rt.db() as db:
                sent = events.relay_committed(db, self.rt.redis, self.settings.events_stream, event)
            metrics.inc(self.rt.redis, "events", sent)
        except (redis.exceptions.RedisError, OperationalError) as exc:
            log.warning("event left for the sweep: %s", type(exc).__name__)

    def _mark_retrying(self, job: Job, key: str, reason: str, ambiguous: bool) -> None:
        with self.rt.db() as db:
            row = db.get(Session, key)
            assert row is not None
            row.state = "retrying"
            row.ambiguous = row.ambiguous or ambiguous
            row.error = reason
            row.error_kind = None
            row.updated_at = now()
            db.commit()
        self._status(job, "retrying")

    def _mirror_final(self, job: Job, row: Session) -> None:
        """A duplicate delivery: copy the recorded outcome to this request's status."""
        fields: dict[str, str] = {"humanId": row.human_id}
        if row.state == "succeeded" and row.client_user_id:
            fields["clientUserId"] = row.client_user_id
            with self.rt.db() as db:
                sealed = db.scalar(select(User.public_token).where(User.human_id == row.human_id))
            if sealed:
                fields["publicToken"] = sealed
        if row.state == "failed" and row.error:
            fields["error"] = row.error
        self._status(job, row.state, **fields)

    def _status(self, job: Job, state: str, **fields: str) -> None:
        fields.setdefault("humanId", job.human_id)
        status.set_state(self.rt.redis, job.request_id, state, self.settings.status_ttl_s, **fields)


class SessionLock(Lock):
    """The session's Redis lock: taken in the same round trip that marks the request
    running, released in the success's round trip, renewed only once a third of its term
    has passed (a fresh lock needs no round trip before the first call or the store)."""

    def __init__(self, r: redis.Redis, name: str, timeout: float):
        # One lock object per run, used by one thread: no thread-local token needed.
        super().__init__(r, name, timeout=timeout, thread_local=False)
        self.renewed = time.monotonic()

    @property
    def held(self) -> bool:
        return self.local.token is not None

    def take(self, job: Job, status_ttl_s: int) -> bool:
        """Acquire without waiting, marking `job`'s request running if it is not ended."""
        token = secrets.token_hex(16)
        got = status.lock_and_begin(
            self.redis,
            self.name,
            token,
            int(self.timeout * 1000) if self.timeout else 0,
            job.request_id,
            job.human_id,
            status_ttl_s,
        )
        if got:
            self.local.token = token.encode()
            self.renewed = time.monotonic()
        return got

    def queue_release(self, pipe: Any) -> bytes:
        """Release in a pipeline the caller executes; returns the token, which the caller
        puts back in `local.token` if the pipeline fails. EVAL, not EVALSHA: a script
        object in a pipeline costs a SCRIPT EXISTS round trip of its own."""
        token: bytes = self.local.token
        self.local.token = None
        pipe.eval(self.LUA_RELEASE_SCRIPT, 1, self.name, token)
        return token

    def renew(self) -> None:
        assert self.timeout is not None
        if time.monotonic() - self.renewed > self.timeout / 3:
            self.reacquire()
            self.renewed = time.monotonic()


def _renew(lock: SessionLock) -> None:
    """Renew the session lock if Redis answers; the store goes ahead either way, because the
    tokens in hand are the user's only copy (a duplicate delivery can't overwrite a success)."""
    try:
        lock.renew()
    except redis.exceptions.RedisError as exc:
        log.warning("could not renew the session lock before storing: %s", type(exc).__name__)


# Statements of the hot path, built once (values come as parameters) and run on the
# session's Core connection: nothing in the ORM session holds these rows, and the ORM's
# execute path cost more CPU than the statements themselves.
_MARK_SUCCEEDED = (
    update(sessions_table)
    .where(
        sessions_table.c.session_hash == bindparam("key"),
        sessions_table.c.state != "succeeded",
    )
    .values(
        state="succeeded",
        client_user_id=bindparam("client_user_id"),
        error=None,
        error_kind=None,
        sealed_session_token=None,
        updated_at=bindparam("now"),
    )
)


@lru_cache(maxsize=4)
def _create_session(dialect: str) -> Any:
    """INSERT … ON CONFLICT DO NOTHING RETURNING, built once (values come as parameters)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = sessions_table
    return (
        insert(table)
        .on_conflict_do_nothing(index_elements=[table.c.session_hash])
        .returning(table.c.session_hash)
    )


def _load_or_create(db: DbSession, job: Job, key: str, cipher: Cipher) -> Session:
    """The session's durable record. A first delivery creates it already `running` with one
    attempt, in one statement (a race-free insert); a later one reads what is there."""
    stamp = now()
    values = {
        "session_hash": key,
        "request_id": job.request_id,
        "human_id": job.human_id,
        "received_us": job.received_us,
        "state": "running",
        "attempts": 1,
        "sealed_session_token": cipher.seal(job.session_token),
        "ambiguous": False,
        "created_at": stamp,
        "updated_at": stamp,
    }
    created = db.connection().execute(_create_session(db.get_bind().dialect.name), values).first()
    if created is not None:
        # What the row holds, without reading it back.
        return Session(**values)
    row = db.get(Session, key, populate_existing=True)
    assert row is not None
    return row
