"""The exchange task's consumer: each message alone (Celery's own), or several run together.

With HUMANCONNECT_EXCHANGE_BATCH above 1, on the thread pool, the worker's consumer keeps the
exchange messages it takes and hands them to one run on the pool every that many, or
`FLUSH_S` after the first when fewer came. The messages are the ones the web queues, one per
session: the accept script, the backlog cap, the lanes and the reconciler count them as
before.

- A message is acked once the batch says its delivery ended or its next try was sent; the
  rest are put back in the queue (with Redis away, they come back with the visibility
  timeout). A worker killed mid-batch leaves every one of them unacked, as a single task does.
- A message with a countdown (a next try), or one a batch can't read, takes Celery's own
  path and runs alone: kept in a batch's buffer it would hold the place of a new finish.

celery-batches does much the same, but acks a batch's messages even when the batch could not
end them, and its 0.11 pins Celery below 5.7: installed, it took the service back to 5.6,
whose messages the web's template (producer/message.py) no longer matches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.concurrency.thread import TaskPool as ThreadPool
from celery.worker.strategy import default as default_strategy

from humanconnect.request import ExchangeRequest
from humanconnect.settings import get_settings

log = logging.getLogger(__name__)

#: The headers a message's trace context travels in (W3C Trace Context and Baggage).
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
#: A batch runs with what came within this long of its first message: a lone finish waits
#: no longer for company.
FLUSH_S = 0.01


@dataclass(frozen=True)
class Delivery:
    """One exchange message of a batch, as the batch reads it."""

    id: str
    request: ExchangeRequest
    #: The kwargs as sent, for the next try's message.
    kwargs: dict[str, Any]
    routing_key: str | None
    retries: int
    #: The trace context the message carries (W3C headers), for the session's own span.
    trace_headers: dict[str, str]


#: Runs a batch; returns the ids of the deliveries it ended or sent round again.
RunBatch = Callable[[list[Delivery]], list[str]]


class ExchangeTask(Task):
    """A task whose consumer batches its messages when the settings say so; the task is
    then called with the list of deliveries (`run_batch`) instead of one message's kwargs."""

    #: Set by the task module: what runs a batch.
    run_batch: RunBatch

    def Strategy(self, task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:  # noqa: N802 - Celery's name
        plain = default_strategy(task, app, consumer, **kwargs)
        # No more than the worker may hold unacked at once (one message per thread): a
        # larger batch would only ever be flushed by the clock.
        size = min(get_settings().exchange_batch, consumer.pool.limit or 1)
        if size <= 1:
            return plain
        if not isinstance(consumer.pool, ThreadPool):
            log.warning("HUMANCONNECT_EXCHANGE_BATCH needs the thread pool: messages run alone")
            return plain
        return _Batcher(self.run_batch, consumer, plain, size).handle


class _Batcher:
    """The consumer's side: keep messages, hand them to the pool in batches."""

    def __init__(self, run: RunBatch, consumer: Any, plain: Callable[..., Any], size: int):
        self.run = run
        self.pool = consumer.pool
        self.timer = consumer.timer
        self.errors = consumer.connection_errors
        self.plain = plain
        self.size = size
        self.kept: list[tuple[Delivery, Any, Any]] = []
        self.due: Any = None

    def handle(
        self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any
    ) -> None:
        """Celery's strategy call, on the consumer's thread."""
        delivery = _read(message) if body is None else None
        if delivery is None:
            self.plain(message, body, ack, reject, callbacks, **kw)
            return
        self.kept.append((delivery, ack, reject))
        if len(self.kept) >= self.size:
            self.flush()
        elif self.due is None:
            self.due = self.timer.call_after(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self.due is not None:
            self.due.cancel()
            self.due = None
        batch, self.kept = self.kept, []
        if not batch:
            return

        def ended(ids: list[str]) -> None:
            done = set(ids)
            for delivery, ack, reject in batch:
                if delivery.id in done:
                    ack(log, self.errors)
                else:
                    reject(log, self.errors, True)

        self.pool.apply_async(self._run, ([d for d, _, _ in batch],), callback=ended)

    def _run(self, deliveries: list[Delivery]) -> list[str]:
        try:
            return self.run(deliveries)
        except Exception:  # a fault of the batch's own: every message back to the queue
            log.exception("a batch of %d sessions failed", len(deliveries))
            return []


def _read(message: Any) -> Delivery | None:
    """The message as a batch's delivery; None for one that runs alone: a countdown, or one
    that is not one ExchangeRequest's (Celery's own path judges it, and refuses it, as before)."""
    headers = message.headers or {}
    if headers.get("eta") or headers.get("task") is None:
        return None
    try:
        args, kwargs, _embed = message.payload
        if args or not isinstance(kwargs, dict):
            return None
        return Delivery(
            id=str(headers["id"]),
            request=ExchangeRequest(**kwargs),
            kwargs=kwargs,
            routing_key=(message.delivery_info or {}).get("routing_key"),
            retries=int(headers.get("retries") or 0),
            trace_headers={k: headers[k] for k in TRACE_HEADERS if isinstance(headers.get(k), str)},
        )
    except Exception:  # noqa: BLE001 - judged again on Celery's own path
        return None
