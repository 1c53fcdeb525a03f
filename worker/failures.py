"""Permanently failed exchanges: listing them, and re-queueing those whose cause was transient."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from worker import status
from worker.clock import now, now_us
from worker.models import Session
from worker.runtime import Runtime


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
        return self.error_kind == "transient"


def list_failed(rt: Runtime, limit: int = 1000) -> list[Failure]:
    """Failed sessions, newest first."""
    with rt.db() as db:
        rows = db.scalars(
            select(Session)
            .where(Session.state == "failed")
            .order_by(Session.updated_at.desc())
            .limit(limit)
        ).all()
        return [
            Failure(r.request_id, r.human_id, r.error_kind, r.error, r.updated_at) for r in rows
        ]


def requeue_transient(rt: Runtime, send: Callable[[dict[str, object]], None]) -> int:
    """Queue again every failure whose cause was transient; returns how many.

    Each gets a fresh retry window; its receive time stays, so newest-session-wins still
    orders it by when the user finished.
    """
    queued = 0
    with rt.db() as db:
        rows = db.scalars(
            select(Session).where(Session.state == "failed", Session.error_kind == "transient")
        ).all()
        for row in rows:
            if not row.sealed_session_token:
                continue
            row.state, row.error, row.error_kind, row.updated_at = "queued", None, None, now()
            db.commit()
            window_start_us = now_us()
            # The same re-send fields the producer keeps, so the reconciler covers this
            # enqueue too (worker/reconcile.py).
            status.set_state(
                rt.redis,
                row.request_id,
                "queued",
                rt.settings.status_ttl_s,
                humanId=row.human_id,
                clientId=rt.settings.effective_client_id,
                sealedSessionToken=row.sealed_session_token,
                receivedUs=str(row.received_us),
                windowStartUs=str(window_start_us),
            )
            send(
                {
                    "request_id": row.request_id,
                    "human_id": row.human_id,
                    "client_id": rt.settings.effective_client_id,
                    "sealed_session_token": row.sealed_session_token,
                    "received_us": row.received_us,
                    "window_start_us": window_start_us,
                }
            )
            queued += 1
    return queued
