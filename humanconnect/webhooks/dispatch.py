"""The dispatcher of one endpoint: claim what is due, send it, settle it, while any is due.

One dispatcher per endpoint at a time across the deployment (a Redis lock; a second one
started while a Redis restart lost the lock is harmless: claims never overlap). It sends
`concurrency` attempts at once, so a slow receiver holds that many threads and no more, and
it stops after a batch without a single success: a failing endpoint waits for its next
tick instead of holding a worker, and the other endpoints' dispatchers never wait on it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from humanconnect import events, metrics, tracing
from humanconnect.clock import now, timestamp
from humanconnect.locks import held_or_skip
from humanconnect.redis_keys import webhook_lock
from humanconnect.runtime import Runtime
from humanconnect.webhooks import deliveries, signing
from humanconnect.webhooks.deliveries import Due, Result
from humanconnect.webhooks.sender import Sender, safe_url

log = logging.getLogger(__name__)

#: How long one task keeps dispatching before it leaves the rest to the next tick.
BUDGET_S = 20.0
#: Claimed per round, per slot of concurrency.
BATCH_PER_SLOT = 16


@dataclass
class Dispatcher:
    """Everything a process needs to deliver to one endpoint."""

    rt: Runtime
    endpoint: str
    sender: Sender
    signer: signing.Signer
    pool: ThreadPoolExecutor
    concurrency: int

    @property
    def batch(self) -> int:
        return self.concurrency * BATCH_PER_SLOT

    @property
    def lease_s(self) -> float:
        """A claim outlives the slowest batch (every attempt timing out, BATCH_PER_SLOT
        rounds of `concurrency` each), then some."""
        return BATCH_PER_SLOT * self.sender.timeout_s + 10.0

    def run(self, budget_s: float = BUDGET_S) -> Counter[str]:
        """Deliver what is due until nothing is, the endpoint fails, or the budget is spent."""
        key = webhook_lock(deliveries.endpoint_digest(self.endpoint))
        totals: Counter[str] = Counter()
        with held_or_skip(self.rt.redis, key, timeout=self.lease_s) as lock:
            if lock is None:
                return totals
            deadline = time.monotonic() + budget_s
            while time.monotonic() < deadline:
                counts = self.round()
                if counts is None:
                    break
                totals += counts
                if not counts["delivered"]:
                    break
                try:
                    lock.reacquire()
                except redis.exceptions.LockError:
                    break  # lapsed (a round outlasted the lease): the next tick goes on
        if totals["failed"] or totals["retrying"]:
            log.info(
                "webhooks endpoint=%s delivered=%d retrying=%d failed=%d",
                safe_url(self.endpoint),
                totals["delivered"],
                totals["retrying"],
                totals["failed"],
            )
        return totals

    def round(self) -> Counter[str] | None:
        """One batch: claimed, sent, settled. None when nothing was due."""
        schedule = self.rt.settings.webhook_retry_schedule
        with self.rt.db() as db:
            due = deliveries.claim(db, self.endpoint, limit=self.batch, lease_s=self.lease_s)
        if not due:
            return None
        results = list(self.pool.map(self.attempt, due))
        with self.rt.db() as db:
            counts = deliveries.settle(db, zip(due, results, strict=True), schedule)
        self._record(due, results, counts)
        return counts

    def attempt(self, due: Due) -> Result:
        """Sign and send one delivery, stamped with this attempt's time."""
        event, parent = events.payload(due.fields)
        body = signing.body(event)
        headers = self.signer.headers(due.event_id, body, now())
        with tracing.webhook_attempt(parent, event, due.attempts):
            return self.sender.send(self.endpoint, body, headers)

    def _record(self, due: list[Due], results: list[Result], counts: Counter[str]) -> None:
        stamp = now().timestamp()
        latencies = [
            stamp - timestamp(d.created_at)
            for d, r in zip(due, results, strict=True)
            if r.delivered
        ]
        try:
            pipe = self.rt.redis.pipeline(transaction=False)
            for outcome, n in counts.items():
                metrics.queue_inc(pipe, "webhooks", n, outcome=outcome)
            metrics.queue_observe(pipe, "webhook_seconds", latencies)
            pipe.execute()
        except redis.exceptions.RedisError:
            log.debug("webhook metrics not recorded")
