"""Exchanging one session for tokens: the logic behind the `exchange_session` task.

Plain functions and one class, testable without Celery. The task only maps an `Outcome` to
"done" or "retry later". The `sessions` record (humanconnect/storage/sessions.py) makes a delivery
idempotent, the session lock (humanconnect/locks.py) keeps two deliveries apart, every
upstream call goes through the guard (humanconnect/upstream/guard.py), and a failure is
written down by humanconnect/failure_record.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from tenacity import RetryCallState

from humanconnect import erasure, events, metrics, redis_keys
from humanconnect.announce import Announcer
from humanconnect.clock import now_us, to_us
from humanconnect.crypto import session_hash
from humanconnect.errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError
from humanconnect.failure_record import FailureRecord, store_retrying
from humanconnect.locks import SessionLock
from humanconnect.minting import Minter
from humanconnect.request import Flow, Job
from humanconnect.runtime import Runtime
from humanconnect.states import ErrorKind, RequestState
from humanconnect.storage import sessions
from humanconnect.storage.models import OutboxEvent, SessionRecord
from humanconnect.storage.tokens import save_tokens
from humanconnect.upstream.client import Tokens, exchange_tokens
from humanconnect.upstream.guard import AcquireSlot, UpstreamGuard
from humanconnect.upstream.retry import backoff, retry_cause

log = logging.getLogger(__name__)

# Pause before looking again at a session another delivery is working on.
BUSY_COUNTDOWN_S = 5.0
MISMATCH_REASON = (
    "the upstream's answer is for another user than the connect ticket vouched for: "
    "nothing was stored"
)
ANSWER_LOST_REASON = (
    "the upstream refused the session after an earlier call got no answer: the token was "
    "probably used and its answer lost ({reason}); ask the user to connect again"
)


@dataclass(frozen=True)
class Outcome:
    """What a run ended with: a final state, or a pause before the next try."""

    state: str
    retry_in: float | None = None
    error: str | None = None
    upstream_calls: int = 0


@dataclass
class _Attempt:
    """What one run learns as it goes."""

    job: Job
    key: str
    lock: SessionLock
    #: Past this (µs), the session fails rather than wait for another try.
    deadline_us: int
    #: An earlier delivery may have reached the upstream without its answer reaching us.
    ambiguous_before: bool = False
    #: A call of this run may have reached the upstream without its answer reaching us.
    ambiguous: bool = False
    #: Upstream latencies, recorded with the run's last Redis round trip.
    timings: list[float] = field(default_factory=list)

    @property
    def calls(self) -> int:
        """Upstream calls this run made (each one timed)."""
        return len(self.timings)


class Exchanger:
    """Runs one delivery of a session to its end or to its next pause."""

    def __init__(self, rt: Runtime, acquire_slot: AcquireSlot):
        self.rt = rt
        self.settings = rt.settings
        self.guard = UpstreamGuard(rt.redis, acquire_slot, rt.settings)
        #: An access finish's fetch (the provider's current flow).
        self.minter = Minter(rt, self.guard)
        self.announce = Announcer(rt)
        self.failures = FailureRecord(rt, self.announce)

    def run(self, job: Job, *, retries: int = 0) -> Outcome:
        """Exchange `job` unless it is already done or being done by another delivery."""
        at = self.attempt(job)
        if not at.lock.take(job.request_id, job.human_id, self.settings.status_ttl_s):
            return Outcome("busy", retry_in=BUSY_COUNTDOWN_S)
        return self.holding(at, lambda: self._run_locked(at, retries))

    def attempt(self, job: Job) -> _Attempt:
        """A run of `job`, its session lock not taken yet."""
        key = session_hash(job.session_token)
        lock = SessionLock(
            self.rt.redis, redis_keys.session_lock(key), self.settings.session_lock_s
        )
        start_us = job.window_start_us or job.received_us
        return _Attempt(job, key, lock, start_us + to_us(self.settings.retry_window_s))

    def holding(self, at: _Attempt, step: Callable[[], Outcome]) -> Outcome:
        """`step` of a run whose lock is held, then the lock let go (if the success's round
        trip has not released it). A record gone from under the run is what an erasure of
        its user does: the finish ends so."""
        job = at.job
        try:
            return step()
        except (erasure.ErasedMeanwhile, sessions.MissingSession):
            if not erasure.erased_since(self.rt, job):
                raise
            return self.end_erased(at)
        finally:
            at.lock.release_quietly(job.request_id)

    def end_erased(self, at: _Attempt) -> Outcome:
        """End a finish whose user was erased after it was received."""
        erasure.end_finish(self.rt, at.job.request_id, at.key)
        self.announce.release_access_claim(at.job)
        return Outcome(RequestState.FAILED, error=erasure.ERASED_ERROR)

    def _run_locked(self, at: _Attempt, retries: int) -> Outcome:
        with self.rt.db() as db:
            begun = self.begin_in(db, at)
            if isinstance(begun, Outcome):
                db.rollback()
                return begun
            db.commit()
        if begun is not None:
            # Outside that session: SQLite runs on one pooled connection per process.
            return self.mirror(at, begun)
        try:
            tokens = self.call(at)
        except UpstreamError as exc:
            return self.after_refusal(at, exc, retries)
        return self.after_answer(at, tokens)

    def begin_in(self, db: Session, at: _Attempt) -> SessionRecord | Outcome | None:
        """The run's first statements, in the caller's transaction (the caller commits): the
        session's record made or read and its attempt begun (None), or what ends the run
        here: its record already final (the row, to mirror once committed), or another
        delivery under way (an Outcome; the caller rolls back). Raises ErasedMeanwhile when
        its user was erased since it was received (the row created is rolled back)."""
        job = at.job
        row, first = sessions.load_or_create(
            db,
            key=at.key,
            request_id=job.request_id,
            human_id=job.human_id,
            received_us=job.received_us,
            sealed_session_token=self.rt.cipher.seal(job.session_token),
            expected_client_user_id=job.expected_client_user_id,
            connected_sources=job.connected_sources,
        )
        if erasure.marked(db, (job.human_id, job.expected_client_user_id), job.received_us):
            raise erasure.ErasedMeanwhile(job.request_id)
        if RequestState(row.state).final:
            return row
        # A run that died while `running` may have reached the upstream unanswered.
        at.ambiguous_before = not first and (
            row.ambiguous or (row.state == RequestState.RUNNING and row.attempts > 0)
        )
        if not first:
            # An access token can be fetched again, so unlike a single-use session
            # token the record is asked too (sessions.attempt_under_way says why).
            lock_s = self.settings.session_lock_s
            if job.flow is Flow.ACCESS and sessions.attempt_under_way(row, lock_s):
                return Outcome("busy", retry_in=BUSY_COUNTDOWN_S)
            sessions.begin_attempt(row)
        return None

    def mirror(self, at: _Attempt, row: SessionRecord) -> Outcome:
        """A delivery of a session already final: its outcome copied to this request."""
        self.announce.mirror_final(at.job, row)
        return Outcome(row.state, error=row.error)

    def after_refusal(self, at: _Attempt, exc: UpstreamError, retries: int) -> Outcome:
        """A call that ended without tokens: failed for good, or a pause before the next
        try (failed too once the retry window is spent)."""
        job = at.job
        self._observe(at)
        if isinstance(exc, PermanentUpstreamError):
            # Only a session token is single-use: an access fetch refused is just refused.
            lost = (at.ambiguous_before or at.ambiguous) and job.flow is Flow.TOKENS
            kind = ErrorKind.ANSWER_LOST if lost else ErrorKind.PERMANENT
            return self._fail(at, exc.reason, kind)
        assert isinstance(exc, TransientUpstreamError)
        at.ambiguous = at.ambiguous or exc.ambiguous
        pause = backoff(
            retries,
            initial=self.settings.retry_initial_s * 4,
            cap=self.settings.retry_max_countdown_s,
            retry_after=exc.retry_after,
        )
        if now_us() + to_us(pause) > at.deadline_us:
            reason = f"upstream unavailable for the whole retry window: {exc.reason}"
            return self._fail(at, reason, ErrorKind.TRANSIENT)
        with self.rt.db() as db:
            sessions.mark_retrying(db, at.key, exc.reason, at.ambiguous)
        self.announce.status(job, RequestState.RETRYING)
        metrics.inc(self.rt.redis, "retries", cause=retry_cause(exc), where="queue")
        return Outcome(
            RequestState.RETRYING, retry_in=pause, error=exc.reason, upstream_calls=at.calls
        )

    def mismatched(self, at: _Attempt, tokens: Tokens) -> bool:
        """Whether the answer is for another user than the connect ticket vouched for."""
        expected = at.job.expected_client_user_id
        return expected is not None and tokens.client_user_id != expected

    def fail_mismatch(self, at: _Attempt) -> Outcome:
        # Someone opened Connect as another user: none of this answer is kept.
        self._observe(at)
        return self._fail(at, MISMATCH_REASON, ErrorKind.CLIENT_USER_MISMATCH, answered=True)

    def after_answer(self, at: _Attempt, tokens: Tokens) -> Outcome:
        """Keep the upstream's answer: stored, then announced."""
        if self.mismatched(at, tokens):
            return self.fail_mismatch(at)
        try:
            applied, event = self.store(at, tokens)
        except PermanentUpstreamError as exc:
            return self.store_refused(at, exc)
        self.announce.success(at.job, tokens, event, at.lock, at.timings)
        return self.succeeded(at, applied)

    def store_refused(self, at: _Attempt, exc: PermanentUpstreamError) -> Outcome:
        self._observe(at)
        return self._fail(at, exc.reason, ErrorKind.PERMANENT)

    def succeeded(self, at: _Attempt, applied: bool) -> Outcome:
        log.info(
            "exchange succeeded request=%s calls=%d newest=%s",
            at.job.request_id,
            at.calls,
            applied,
        )
        return Outcome(RequestState.SUCCEEDED, upstream_calls=at.calls)

    # -- steps ---------------------------------------------------------------------------
    def call(self, at: _Attempt) -> Tokens:
        """A few quick tries inside this run; longer outages go back to the queue."""
        s = self.settings
        secret = s.client_secret.get_secret_value() if s.client_secret else ""
        job = at.job

        def before() -> None:
            # A full lock term for this call: a slow run never lets a duplicate in.
            at.lock.renew()

        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, UpstreamError) and exc.ambiguous:
                at.ambiguous = True
            metrics.inc(self.rt.redis, "retries", cause=retry_cause(exc), where="inline")
            log.info(
                "upstream transient, retrying inline request=%s attempt=%d reason=%s",
                job.request_id,
                state.attempt_number,
                exc.reason if isinstance(exc, UpstreamError) else type(exc).__name__,
            )

        if job.flow is Flow.ACCESS:
            return self.minter.fetch_access(
                job.expected_client_user_id or "",
                None,
                at.timings,
                before=before,
                before_sleep=note,
                priority=job.waiting,
            )

        def call() -> Tokens:
            return exchange_tokens(
                s.base_url,
                human_id=job.human_id,
                client_id=job.client_id,
                client_secret=secret,
                session_token=job.session_token,
                connect_timeout=s.connect_timeout_s,
                read_timeout=s.read_timeout_s,
            )

        return self.guard.call_with_retries(
            call, timings=at.timings, before=before, before_sleep=note, priority=job.waiting
        )

    def store(self, at: _Attempt, tokens: Tokens) -> tuple[bool, OutboxEvent | None]:
        """Commit tokens and the session's success together, riding out a database outage;
        the event is None when an earlier attempt's commit turns out to have landed.

        The upstream has consumed the session token by now: giving up here would lose the
        user, so this step retries far longer than the others, renewing the lock each time.
        """
        for attempt in store_retrying(before=at.lock.renew_if_reachable):
            with attempt, self.rt.db() as db:
                stored = self.store_in(db, at, tokens)
                if stored is None:
                    db.rollback()
                    return False, None
                db.commit()
                return stored
        raise RuntimeError("the store's retries ended without an outcome")  # pragma: no cover

    def store_in(
        self, db: Session, at: _Attempt, tokens: Tokens
    ) -> tuple[bool, OutboxEvent] | None:
        """The store's statements in the caller's transaction (the caller commits): whether
        these tokens were the user's newest, and the success's event; None when an earlier
        attempt's commit turns out to have landed (the caller rolls back). Raises
        ErasedMeanwhile for a user erased since the finish was received."""
        job = at.job
        erasure.serialize(db, tokens.client_user_id)
        # Only a session not yet succeeded: if a connection broke while an earlier
        # attempt's COMMIT was in flight, that commit may have landed, and its
        # event must stay the only one.
        landed = not sessions.mark_succeeded(
            db, at.key, tokens.client_user_id, job.human_id or tokens.human_id
        )
        # Read after that first write: on SQLite it holds the write lock by now, so
        # an erasure is wholly before this or wholly after.
        ids = (tokens.client_user_id, tokens.human_id, job.human_id)
        if erasure.marked(db, (*ids, job.expected_client_user_id), job.received_us):
            raise erasure.ErasedMeanwhile(job.request_id)
        if landed:
            log.info("store had landed before its connection broke request=%s", job.request_id)
            return None
        applied = self._save(db, at, tokens)
        extra = {"connectedSources": job.connected_sources} if job.connected_sources else {}
        event = events.record(
            db,
            "connect.completed",
            targets=self.rt.webhook_targets,
            humanId=tokens.human_id,
            clientUserId=tokens.client_user_id,
            requestId=job.request_id,
            **extra,
        )
        return applied, event

    def _save(self, db: Session, at: _Attempt, tokens: Tokens) -> bool:
        """The tokens into the user's row: a session's whole set, or an access finish's
        token and its expiry."""
        return save_tokens(
            db,
            self.rt.cipher,
            human_id=tokens.human_id,
            client_user_id=tokens.client_user_id,
            access_token=tokens.access_token,
            public_token=tokens.public_token,
            received_us=at.job.received_us,
            session_hash=at.key,
            access_expires_us=tokens.access_expires_us,
        )

    def _fail(
        self, at: _Attempt, reason: str, kind: ErrorKind, *, answered: bool = False
    ) -> Outcome:
        """Record the session failed (humanconnect/failure_record.py). `answered`: the
        upstream consumed the token, so the record rides out a database outage."""
        if kind is ErrorKind.ANSWER_LOST:
            reason = ANSWER_LOST_REASON.format(reason=reason)
        state = self.failures.record(at.job, at.key, at.lock, reason, kind, answered=answered)
        if state == RequestState.SUCCEEDED:
            return Outcome(RequestState.SUCCEEDED, upstream_calls=at.calls)
        return Outcome(RequestState.FAILED, error=reason, upstream_calls=at.calls)

    def note_outage(self, job: Job, reason: str) -> None:
        """An access finish's delivery stopped by our own Redis or database: its record says
        it is no longer running, so its retry is not taken for another delivery under way
        (`sessions.attempt_under_way`). Best effort: with the database away too, the retry waits
        out the lock's term instead."""
        if job.flow is not Flow.ACCESS:
            return  # a session's `running` record is what marks a call maybe unanswered
        try:
            with self.rt.db() as db:
                sessions.pause_running(db, session_hash(job.session_token), reason)
        except (OperationalError, PoolTimeout):
            pass

    def fail_internal(self, job: Job, reason: str) -> None:
        """Record a failure that is ours, not the upstream's (retries of a bug ran out)."""
        self.failures.internal(job, reason)

    def _observe(self, at: _Attempt) -> None:
        metrics.observe_many(self.rt.redis, "upstream_seconds", at.timings, endpoint="tokens")
