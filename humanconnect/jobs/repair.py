"""Repairing users whose publicToken is missing, through the provider's publictokens endpoint.

One run at a time (a Redis lock that expires if its holder dies and that only its holder
can release), keyset batches over a partial index (never all users in memory, never a full
scan per batch), each call through the same guard as the exchange's (upstream/guard.py: the
breaker, the global rate limit, the inline retry policy).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

from redis.lock import Lock
from sqlalchemy import ColumnElement, Table, bindparam, func, select, update
from sqlalchemy.orm import Session
from tenacity import RetryCallState

from humanconnect import events, metrics
from humanconnect.clock import now, now_us, to_us
from humanconnect.errors import PermanentUpstreamError, TransientUpstreamError
from humanconnect.locks import held_or_skip
from humanconnect.redis_keys import REPAIR_LOCK as LOCK_KEY
from humanconnect.runtime import Runtime
from humanconnect.states import ErrorKind
from humanconnect.storage.models import User
from humanconnect.upstream.client import fetch_public_token
from humanconnect.upstream.guard import AcquireSlot, UpstreamGuard
from humanconnect.upstream.retry import retry_cause

log = logging.getLogger(__name__)

# The lock outlives a batch comfortably and is renewed after each; a dead holder's lock
# frees itself this fast.
LOCK_TTL_S = 60
BATCH = 200
# After the n-th transient failure a user waits min(60 s * 2^(n-1), 1 day) before the next try.
BACKOFF_BASE_S = 60.0
BACKOFF_CAP_S = 86400.0


@dataclass
class Candidate:
    id: int
    human_id: str
    client_user_id: str
    received_us: int
    repair_attempts: int


@dataclass
class Report:
    """What one run did."""

    seen: int = 0
    repaired: int = 0
    transient: int = 0
    permanent: int = 0
    #: A newer finish stored tokens while the call was in flight: left as it is.
    superseded: int = 0
    #: Another run held the lock: this one did nothing.
    skipped: bool = False
    dry_run: list[str] = field(default_factory=list)


def backoff_s(attempts: int) -> float:
    """Pause after the `attempts`-th transient failure (1-based), jittered by up to 10 %."""
    base = min(BACKOFF_BASE_S * 2 ** max(attempts - 1, 0), BACKOFF_CAP_S)
    return base * (1 + random.random() / 10)


def _due(now: int) -> tuple[ColumnElement[bool], ...]:
    return (
        User.public_token.is_(None),
        User.repair_error.is_(None),
        (User.repair_after_us.is_(None)) | (User.repair_after_us <= now),
    )


def count_due(db: Session) -> int:
    """Users a run would try now."""
    return int(db.scalar(select(func.count()).where(*_due(now_us()))) or 0)


def candidates(db: Session, after_id: int, limit: int) -> list[Candidate]:
    """The next batch after `after_id` (keyset pagination on the partial index)."""
    rows = db.execute(
        select(User.id, User.human_id, User.client_user_id, User.received_us, User.repair_attempts)
        .where(User.id > after_id, *_due(now_us()))
        .order_by(User.id)
        .limit(limit)
    ).all()
    return [Candidate(*row) for row in rows]


class Repairer:
    """Runs repairs; `acquire_slot` is the global rate limiter's acquire."""

    def __init__(self, rt: Runtime, acquire_slot: AcquireSlot, threads: int | None = None):
        self.rt = rt
        self.s = rt.settings
        self.guard = UpstreamGuard(rt.redis, acquire_slot, rt.settings)
        self.threads = threads or rt.settings.repair_threads

    def run(
        self,
        *,
        limit: int | None = None,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Report:
        """One repair run, or nothing if another holds the lock."""
        report = Report()
        with held_or_skip(self.rt.redis, LOCK_KEY, timeout=LOCK_TTL_S) as lock:
            if lock is None:
                log.debug("repair skipped: another run holds the lock")
                report.skipped = True
                return report
            with ThreadPoolExecutor(self.threads, thread_name_prefix="repair") as pool:
                self._batches(report, pool, lock, limit, dry_run, progress)
        # A run that found nobody to repair says so only at DEBUG: it runs every few minutes.
        log.log(
            logging.INFO if report.seen else logging.DEBUG,
            "repair run: seen=%d repaired=%d transient=%d permanent=%d superseded=%d",
            report.seen,
            report.repaired,
            report.transient,
            report.permanent,
            report.superseded,
        )
        return report

    def _batches(
        self,
        report: Report,
        pool: ThreadPoolExecutor,
        lock: Lock,
        limit: int | None,
        dry_run: bool,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Keyset batches; the next batch's calls run while this one is being recorded."""
        after_id = 0
        pending: tuple[list[Candidate], list[Future[tuple[str, str, float]]]] | None = None
        while True:
            batch: list[Candidate] = []
            if limit is None or report.seen < limit:
                size = BATCH if limit is None else min(BATCH, limit - report.seen)
                with self.rt.db() as db:
                    batch = candidates(db, after_id, size)
            if batch:
                after_id = batch[-1].id
                report.seen += len(batch)
            if dry_run:
                if not batch:
                    return
                report.dry_run += [c.human_id for c in batch]
                if progress:
                    progress(len(batch))
                continue
            started = (batch, [pool.submit(self._fetch, c) for c in batch]) if batch else None
            if pending is not None:
                done_batch, futures = pending
                results = [f.result() for f in futures]
                self._record(report, done_batch, [(k, v) for k, v, _ in results])
                metrics.observe_many(
                    self.rt.redis,
                    "upstream_seconds",
                    [t for _, _, t in results],
                    endpoint="publictokens",
                )
                lock.reacquire()
                if progress:
                    progress(len(done_batch))
            if started is None:
                return
            pending = started

    def _fetch(self, c: Candidate) -> tuple[str, str, float]:
        """(kind, value, seconds spent upstream): kind is ok (value: the token), transient
        or permanent (value: the reason)."""
        secret = self.s.client_secret.get_secret_value() if self.s.client_secret else ""
        timings: list[float] = []

        def call() -> str:
            return fetch_public_token(
                self.s.base_url,
                human_id=c.human_id,
                client_id=self.s.effective_client_id,
                client_secret=secret,
                connect_timeout=self.s.connect_timeout_s,
                read_timeout=self.s.read_timeout_s,
            )

        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            metrics.inc(self.rt.redis, "retries", cause=retry_cause(exc), where="repair")

        try:
            token = self.guard.call_with_retries(
                call, timings=timings, before_sleep=note, count_success=True
            )
        except PermanentUpstreamError as exc:
            return (ErrorKind.PERMANENT, exc.reason, sum(timings))
        except TransientUpstreamError as exc:
            # Later runs try again after the user's backoff (an open breaker included).
            return (ErrorKind.TRANSIENT, exc.reason, sum(timings))
        return ("ok", token, sum(timings))

    def _record(
        self, report: Report, batch: list[Candidate], results: list[tuple[str, str]]
    ) -> None:
        """One transaction per batch: tokens, bookkeeping and events together.

        Core statements compiled once and run per row (the per-row rowcount says whether a
        newer finish got there first); the ORM's bulk-update machinery costs far more per user.
        """
        stamp, stamp_us = now(), now_us()
        repaired: list[Candidate] = []
        outcomes: Counter[str] = Counter()
        with self.rt.db() as db:
            conn = db.connection()
            for c, (kind, value) in zip(batch, results, strict=True):
                key = {"user_id": c.id, "seen_received_us": c.received_us}
                if kind == "ok":
                    done = conn.execute(
                        _STORE, {**key, "sealed_token": self.rt.cipher.seal(value), "stamp": stamp}
                    ).rowcount
                    if done:
                        repaired.append(c)
                    outcomes["repaired" if done else "superseded"] += 1
                elif kind == ErrorKind.TRANSIENT:
                    attempts = c.repair_attempts + 1
                    after = stamp_us + to_us(backoff_s(attempts))
                    conn.execute(_BACK_OFF, {**key, "attempts": attempts, "after_us": after})
                    outcomes[ErrorKind.TRANSIENT] += 1
                else:
                    conn.execute(_GIVE_UP, {**key, "reason": value})
                    outcomes[ErrorKind.PERMANENT] += 1
            event_ids = events.record_many(
                db,
                "publictoken.repaired",
                [{"humanId": c.human_id, "clientUserId": c.client_user_id} for c in repaired],
                self.rt.webhook_targets,
            )
            db.commit()
            try:
                events.relay_ids(
                    db, self.rt.redis, self.s.events_stream, event_ids, self.s.replica_wait
                )
            except Exception as exc:  # the sweep relays them later
                log.warning("repair events left for the sweep: %s", type(exc).__name__)
        report.repaired += outcomes["repaired"]
        report.superseded += outcomes["superseded"]
        report.transient += outcomes[ErrorKind.TRANSIENT]
        report.permanent += outcomes[ErrorKind.PERMANENT]
        for outcome, n in outcomes.items():
            metrics.inc(self.rt.redis, "repairs", n, outcome=outcome)


# Each writes only while nobody stored newer tokens meanwhile (a finish changes received_us).
_users = cast(Table, User.__table__)
_STILL = (
    _users.c.id == bindparam("user_id"),
    _users.c.public_token.is_(None),
    _users.c.received_us == bindparam("seen_received_us"),
)
_STORE = (
    update(_users)
    .where(*_STILL)
    .values(
        public_token=bindparam("sealed_token"),
        repair_attempts=0,
        repair_after_us=None,
        repair_error=None,
        updated_at=bindparam("stamp"),
    )
)
_BACK_OFF = (
    update(_users)
    .where(*_STILL)
    .values(repair_attempts=bindparam("attempts"), repair_after_us=bindparam("after_us"))
)
_GIVE_UP = update(_users).where(*_STILL).values(repair_error=bindparam("reason"))


def retry_failed(rt: Runtime) -> int:
    """Make users whose repair failed for good eligible again (an operator's decision)."""
    with rt.db() as db:
        n = db.execute(
            update(User)
            .where(User.public_token.is_(None), User.repair_error.is_not(None))
            .values(repair_error=None, repair_attempts=0, repair_after_us=None)
        ).rowcount
        db.commit()
        return int(n)
