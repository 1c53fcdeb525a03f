"""Repairing users whose publicToken is missing, through the provider's publictokens endpoint.

One run at a time (a Redis lock that expires if its holder dies and that only its holder
can release), keyset batches over a partial index (never all users in memory, never a full
scan per batch), each call through the global rate limit and the exchange's classification.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from redis.lock import Lock
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session as DbSession

from worker import events, metrics
from worker.clock import now
from worker.errors import PermanentUpstreamError, TransientUpstreamError
from worker.exchange import now_us, retry_cause, to_us
from worker.models import User
from worker.runtime import Runtime
from worker.upstream import fetch_public_token

log = logging.getLogger(__name__)

LOCK_KEY = "hc:lock:repair"
# The lock outlives a batch comfortably and is renewed after each; a dead holder's lock
# frees itself this fast.
LOCK_TTL_S = 60
BATCH = 200
THREADS = 16
# After the n-th transient failure a user waits min(60 s * 2^(n-1), 1 day) before the next try.
BACKOFF_BASE_S = 60.0
BACKOFF_CAP_S = 86400.0
# Inline tries per user within one run, for the blips a later run need not wait for.
INLINE_TRIES = 3
INLINE_MAX_WAIT_S = 1.0


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


def count_due(db: DbSession) -> int:
    """Users a run would try now."""
    return int(db.scalar(select(func.count()).where(*_due(now_us()))) or 0)


def candidates(db: DbSession, after_id: int, limit: int) -> list[Candidate]:
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

    def __init__(self, rt: Runtime, acquire_slot: Callable[[], float], threads: int = THREADS):
        self.rt = rt
        self.s = rt.settings
        self.acquire_slot = acquire_slot
        self.threads = threads

    def run(
        self,
        *,
        limit: int | None = None,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Report:
        """One repair run, or nothing if another holds the lock."""
        report = Report()
        lock = Lock(self.rt.redis, LOCK_KEY, timeout=LOCK_TTL_S)
        if not lock.acquire(blocking=False):
            log.info("repair skipped: another run holds the lock")
            report.skipped = True
            return report
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="repair") as pool:
                self._batches(report, pool, lock, limit, dry_run, progress)
        finally:
            try:
                lock.release()
            except Exception:  # noqa: BLE001 - expired: not ours to release any more
                log.warning("repair lock expired before release")
        log.info(
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
        after_id = 0
        while limit is None or report.seen < limit:
            size = BATCH if limit is None else min(BATCH, limit - report.seen)
            with self.rt.db() as db:
                batch = candidates(db, after_id, size)
            if not batch:
                return
            after_id = batch[-1].id
            report.seen += len(batch)
            if dry_run:
                report.dry_run += [c.human_id for c in batch]
            else:
                results = list(pool.map(self._fetch, batch))
                self._record(report, batch, results)
                lock.reacquire()
            if progress:
                progress(len(batch))

    def _fetch(self, c: Candidate) -> tuple[str, str]:
        """('ok', token) | ('transient', cause) | ('permanent', reason)."""
        secret = self.s.client_secret.get_secret_value() if self.s.client_secret else ""
        for attempt in range(1, INLINE_TRIES + 1):
            self.acquire_slot()
            started = time.monotonic()
            try:
                token = fetch_public_token(
                    self.s.base_url,
                    human_id=c.human_id,
                    client_id=self.s.effective_client_id,
                    client_secret=secret,
                    connect_timeout=self.s.connect_timeout_s,
                    read_timeout=self.s.read_timeout_s,
                )
                return ("ok", token)
            except PermanentUpstreamError as exc:
                return ("permanent", exc.reason)
            except TransientUpstreamError as exc:
                metrics.inc(self.rt.redis, "retries", cause=retry_cause(exc), where="repair")
                wait = exc.retry_after if exc.retry_after is not None else 0.1 * 2**attempt
                if attempt == INLINE_TRIES or wait > INLINE_MAX_WAIT_S:
                    return ("transient", exc.reason)
                time.sleep(wait * (0.5 + random.random() / 2))
            finally:
                metrics.observe(
                    self.rt.redis,
                    "upstream_seconds",
                    time.monotonic() - started,
                    endpoint="publictokens",
                )
        return ("transient", "inline tries exhausted")  # pragma: no cover

    def _record(
        self, report: Report, batch: list[Candidate], results: list[tuple[str, str]]
    ) -> None:
        """One transaction per batch: tokens, bookkeeping and events together."""
        stamp, stamp_us = now(), now_us()
        event_ids: list[int] = []
        outcomes: dict[str, int] = {}
        with self.rt.db() as db:
            for c, (kind, value) in zip(batch, results, strict=True):
                # Only while nobody stored newer tokens meanwhile (a finish changes received_us).
                still = (
                    User.id == c.id,
                    User.public_token.is_(None),
                    User.received_us == c.received_us,
                )
                if kind == "ok":
                    done = db.execute(
                        update(User)
                        .where(*still)
                        .values(
                            public_token=self.rt.cipher.seal(value),
                            repair_attempts=0,
                            repair_after_us=None,
                            repair_error=None,
                            updated_at=stamp,
                        )
                    ).rowcount
                    if done:
                        event = events.record(
                            db,
                            "publictoken.repaired",
                            humanId=c.human_id,
                            clientUserId=c.client_user_id,
                        )
                        db.flush()
                        event_ids.append(event.id)
                        report.repaired += 1
                        outcomes["repaired"] = outcomes.get("repaired", 0) + 1
                    else:
                        report.superseded += 1
                        outcomes["superseded"] = outcomes.get("superseded", 0) + 1
                elif kind == "transient":
                    attempts = c.repair_attempts + 1
                    db.execute(
                        update(User)
                        .where(*still)
                        .values(
                            repair_attempts=attempts,
                            repair_after_us=stamp_us + to_us(backoff_s(attempts)),
                        )
                    )
                    report.transient += 1
                    outcomes["transient"] = outcomes.get("transient", 0) + 1
                else:
                    db.execute(update(User).where(*still).values(repair_error=value))
                    report.permanent += 1
                    outcomes["permanent"] = outcomes.get("permanent", 0) + 1
            db.commit()
            try:
                events.relay_ids(db, self.rt.redis, self.s.events_stream, event_ids)
            except Exception as exc:  # noqa: BLE001 - the sweep relays them later
                log.warning("repair events left for the sweep: %s", type(exc).__name__)
        for outcome, n in outcomes.items():
            metrics.inc(self.rt.redis, "repairs", n, outcome=outcome)


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
