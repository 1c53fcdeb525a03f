"""How a delivery records that its session failed: the row, its one `connect.failed` event,
and the announcements, once, however the database behaves meanwhile.

The exchange (humanconnect/exchange.py) decides that a session failed and why; this module
writes it down. A failure the upstream answered (it used the token) must be recorded in the
same run, through a locked or unreachable database, as a success's store is: a delivery sent
back to the queue would find the token used and misname the failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from humanconnect import erasure, events, metrics
from humanconnect.announce import Announcer, failed_fields
from humanconnect.crypto import session_hash
from humanconnect.locks import SessionLock
from humanconnect.request import Job
from humanconnect.runtime import Runtime
from humanconnect.states import ErrorKind, RequestState
from humanconnect.storage import sessions
from humanconnect.storage.models import OutboxEvent, SessionRecord

# The exchange's logger: its `exchange failed …` lines read as before the split.
log = logging.getLogger("humanconnect.exchange")

#: How long a write after the upstream's answer keeps trying through a database outage.
#: The upstream has consumed the session token by then: giving up would lose the user.
STORE_PATIENCE_S = 600.0


def store_retrying(before: Callable[[], None]) -> Retrying:
    """Patience for a write after the upstream has consumed the token: giving up would lose
    the user (or, for a refusal, misname the failure on the next delivery). `before` runs
    ahead of each try (the lock's renewal)."""
    return Retrying(
        retry=retry_if_exception_type((OperationalError, PoolTimeout)),
        stop=stop_after_delay(STORE_PATIENCE_S),
        wait=wait_random_exponential(multiplier=0.2, max=5.0),
        before=lambda _state: before(),
        reraise=True,
    )


class FailureRecord:
    """Writes a session's failure and tells whoever waits for it."""

    def __init__(self, rt: Runtime, announce: Announcer):
        self.rt = rt
        self.announce = announce

    def record(
        self,
        job: Job,
        key: str,
        lock: SessionLock,
        reason: str,
        kind: ErrorKind,
        *,
        answered: bool = False,
    ) -> RequestState:
        """Record the session failed; the state it ended in (SUCCEEDED when a delivery
        whose lock had lapsed stored the tokens meanwhile: that stands). `answered`: the
        upstream consumed the token, so the record rides out a database outage."""
        write = partial(self._write, job, key, reason, kind)
        if answered:
            write = partial(store_retrying(before=lock.renew_if_reachable), write)
        row, event = write()
        if row.state == RequestState.SUCCEEDED:
            self.announce.mirror_final(job, row)
            return RequestState.SUCCEEDED
        if event is not None:
            events.relay_now(self.rt, event)
        else:  # its event is in the outbox, for the sweep
            log.info(
                "failure record had landed before its connection broke request=%s", job.request_id
            )
        metrics.inc(self.rt.redis, "exchanges", outcome=kind)
        self.announce.status(job, RequestState.FAILED, error=reason)
        log.warning("exchange failed request=%s kind=%s reason=%s", job.request_id, kind, reason)
        return RequestState.FAILED

    def _write(
        self, job: Job, key: str, reason: str, kind: ErrorKind
    ) -> tuple[SessionRecord, OutboxEvent | None]:
        """One try at the failure's record: its row, and its event. None when the row had
        ended already: succeeded by a delivery whose lock had lapsed, or failed by an earlier
        try whose COMMIT landed although its connection broke (its event is the only one)."""
        with self.rt.db() as db:
            row = sessions.locked(db, key)
            event = None
            if not RequestState(row.state).final:
                sessions.mark_failed(row, reason, kind)
                event = events.record(
                    db,
                    "connect.failed",
                    targets=self.rt.webhook_targets,
                    **failed_fields(job, reason),
                )
            db.commit()
        return row, event

    def internal(self, job: Job, reason: str) -> None:
        """Record a failure that is ours, not the upstream's (retries of a bug ran out)."""
        key = session_hash(job.session_token)
        if erasure.erased_since(self.rt, job):
            erasure.end_finish(self.rt, job.request_id, key)
            return
        with self.rt.db() as db:
            row = db.get(SessionRecord, key)
            if row is not None and RequestState(row.state).final:
                return
            if row is not None:
                sessions.mark_failed(row, reason, ErrorKind.INTERNAL)
            event = events.record(
                db, "connect.failed", targets=self.rt.webhook_targets, **failed_fields(job, reason)
            )
            db.commit()
        events.relay_now(self.rt, event)
        metrics.inc(self.rt.redis, "exchanges", outcome=ErrorKind.INTERNAL)
        self.announce.status(job, RequestState.FAILED, error=reason)
