"""Permanently failed exchanges: listing them, and re-queueing those whose cause was transient."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from humanconnect import status_records
from humanconnect.clock import now_us
from humanconnect.request import ExchangeRequest
from humanconnect.runtime import Runtime
from humanconnect.states import ErrorKind, RequestState
from humanconnect.storage import sessions


@dataclass(frozen=True)
class Failure:
    request_id: str
    human_id: str
    error_kind: str | None
    error: str | None
    updated_at: datetime

    @property
    def retryable(self) -> bool:
        """Only the upstream being away for the whole window is worth another try."""
        return self.error_kind == ErrorKind.TRANSIENT


def list_failed(rt: Runtime, limit: int = 1000) -> list[Failure]:
    """Failed sessions, newest first."""
    with rt.db() as db:
        return [
            Failure(r.request_id, r.human_id, r.error_kind, r.error, r.updated_at)
            for r in sessions.failed(db, limit)
        ]


def requeue_transient(rt: Runtime, send: Callable[[ExchangeRequest], None]) -> int:
    """Queue again every failure whose cause was transient; returns how many.

    Each gets a fresh retry window; its receive time stays, so newest-session-wins still
    orders it by when the user finished.
    """
    queued = 0
    with rt.db() as db:
        for row in sessions.transient_failures(db):
            if not row.sealed_session_token:
                continue
            sessions.requeue(row)
            db.commit()
            request = ExchangeRequest(
                request_id=row.request_id,
                human_id=row.human_id,
                client_id=rt.settings.effective_client_id,
                sealed_session_token=row.sealed_session_token,
                received_us=row.received_us,
                window_start_us=now_us(),
                expected_client_user_id=row.expected_client_user_id,
                connected_sources=row.connected_sources or "",
            )
            # The same re-send fields the producer keeps, so the reconciler covers this
            # enqueue too (humanconnect/jobs/reconcile.py).
            status_records.set_state(
                rt.redis,
                row.request_id,
                RequestState.QUEUED,
                rt.settings.status_ttl_s,
                **request.record_fields(),
            )
            send(request)
            queued += 1
    return queued
