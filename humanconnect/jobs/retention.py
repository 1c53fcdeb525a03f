"""Retention: deleting what the service no longer needs once HUMANCONNECT_RETENTION_S has
passed. Finished sessions (with a failed one's sealed session token), relayed outbox rows and
settled webhook deliveries go; stored tokens (`users`) never do, nor anything still moving.

One run at a time (the same skip-if-held lock as the repair). Each batch reads a page of keys
(keyset pagination on the primary key), then deletes in one short transaction those of them
that still qualify: no lock is held for longer than a batch, and a row that changed meanwhile
(`failed --retry` re-queued it, `webhooks retry` made a delivery pending again) is left alone.
Two runs at once can't double-delete: a row deleted is not deleted again, and what each run
counts is what its own statements deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Table, delete, exists, select
from sqlalchemy.orm import Session

from humanconnect.clock import now
from humanconnect.locks import held_or_skip
from humanconnect.redis_keys import RETENTION_LOCK as LOCK_KEY
from humanconnect.runtime import Runtime
from humanconnect.states import FINAL
from humanconnect.storage.models import deliveries_table, outbox_table, sessions_table
from humanconnect.webhooks.deliveries import DELIVERED, FAILED

log = logging.getLogger(__name__)

# Renewed after every batch; a dead holder's lock frees itself this fast.
LOCK_TTL_S = 60
BATCH = 500


@dataclass
class Report:
    """What one run deleted."""

    sessions: int = 0
    deliveries: int = 0
    outbox: int = 0
    #: Another run held the lock: this one did nothing.
    skipped: bool = False


def finished_sessions(cutoff: datetime) -> ColumnElement[bool]:
    """Sessions that ended before `cutoff`; queued, running or retrying ones never qualify."""
    s = sessions_table.c
    return s.state.in_([str(state) for state in FINAL]) & (s.updated_at < cutoff)


def settled_deliveries(cutoff: datetime) -> ColumnElement[bool]:
    """Deliveries delivered or failed before `cutoff`; a pending one never qualifies."""
    d = deliveries_table.c
    return d.state.in_([DELIVERED, FAILED]) & (d.finished_at < cutoff)


def relayed_events(cutoff: datetime) -> ColumnElement[bool]:
    """Outbox rows relayed to the stream before `cutoff` with no delivery row left: a
    delivery still pending (or settled since the cutoff) keeps its event, which it sends,
    and webhook_deliveries.outbox_id refers to it. An unsent row (sent_at null) never
    qualifies."""
    o = outbox_table.c
    referenced = exists().where(deliveries_table.c.outbox_id == o.id)
    return o.sent_at.is_not(None) & (o.sent_at < cutoff) & ~referenced


def purge(rt: Runtime, *, retention_s: float | None = None, batch: int = BATCH) -> Report:
    """One retention run over everything older than `retention_s` (the setting by default),
    or nothing if another run holds the lock."""
    report = Report()
    with held_or_skip(rt.redis, LOCK_KEY, timeout=LOCK_TTL_S) as lock:
        if lock is None:
            log.debug("retention skipped: another run holds the lock")
            report.skipped = True
            return report
        seconds = rt.settings.retention_s if retention_s is None else retention_s
        cutoff = now() - timedelta(seconds=seconds)
        report.sessions = purge_table(
            rt.db, sessions_table, finished_sessions(cutoff), batch, lock.reacquire
        )
        # Deliveries first: an outbox row goes only once no delivery refers to it.
        report.deliveries = purge_table(
            rt.db, deliveries_table, settled_deliveries(cutoff), batch, lock.reacquire
        )
        report.outbox = purge_table(
            rt.db, outbox_table, relayed_events(cutoff), batch, lock.reacquire
        )
    # A run that deleted nothing says so only at DEBUG: it runs every hour.
    log.log(
        logging.INFO if report.sessions or report.deliveries or report.outbox else logging.DEBUG,
        "retention run: sessions=%d deliveries=%d outbox=%d",
        report.sessions,
        report.deliveries,
        report.outbox,
    )
    return report


def purge_table(
    factory: Callable[[], Session],
    table: Table,
    condition: ColumnElement[bool],
    batch: int,
    after_batch: Callable[[], Any] = lambda: None,
) -> int:
    """Delete `table`'s rows matching `condition`, `batch` keys per transaction in primary
    key order; returns how many this call deleted. `after_batch` runs after each (renewing
    the run's lock)."""
    (key,) = table.primary_key.columns
    deleted = 0
    after: Any = None
    while True:
        page = select(key).where(condition).order_by(key).limit(batch)
        if after is not None:
            page = page.where(key > after)
        with factory() as db:
            keys = list(db.scalars(page).all())
        if not keys:
            return deleted
        # A transaction of its own that only writes: on SQLite a read transaction that then
        # writes fails at once ("database is locked") when another writer committed since
        # its read, where a writer alone waits its turn. The condition again: a row may
        # have changed since the page was read.
        with factory() as db:
            result = db.execute(delete(table).where(key.in_(keys), condition))
            db.commit()
        deleted += cast(CursorResult[Any], result).rowcount
        after = keys[-1]
        after_batch()
        if len(keys) < batch:
            return deleted
