"""The exchange task's consumer: each message alone (Celery's own), or several run together.

With HUMANCONNECT_EXCHANGE_BATCH above 1 the worker buffers the exchange messages it takes
(celery-batches) and hands them to one task run every that many, or every `FLUSH_S` when
fewer came. The messages are the ones the web queues, one per session: the accept script,
the backlog cap, the lanes and the reconciler count them as before.

What celery-batches would do and this does not:
- It acks every message of a batch when the batch returns, even one it could not end. Here
  the task returns the ids it ended or sent round again; the rest are put back in the queue
  (and, with Redis away, come back with the visibility timeout). A worker killed mid-batch
  leaves all of them unacked, as a single task does.
- A message with a countdown would wait in the worker's buffer, holding a place the worker
  could have given a new finish. A batch's next try is sent under its own name
  (EXCHANGE_RETRY_TASK) and runs alone, with Celery's own countdown handling.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from humanconnect.settings import get_settings

__all__ = ["FLUSH_S", "ExchangeTask", "SimpleRequest"]

#: A batch runs with what came within this long of its first message: a lone finish waits
#: no longer for company.
FLUSH_S = 0.01


class ExchangeTask(Batches):
    """A task whose consumer batches its messages when the settings say so."""

    flush_interval = FLUSH_S

    def Strategy(self, task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:  # noqa: N802 - Celery's name
        size = get_settings().exchange_batch
        if size <= 1:
            return default_strategy(task, app, consumer, **kwargs)
        self.flush_every = size
        return super().Strategy(task, app, consumer)

    def flush(self, requests: Collection[Request]) -> Any:
        """Run `requests` as one batch on the pool; ack those it ended, put back the rest."""
        batch = ([SimpleRequest.from_request(r) for r in requests],)

        def on_return(ended: list[str] | None) -> None:
            done = set(ended or ())
            for request in requests:
                if request.id in done:
                    request.acknowledge()
                else:
                    request.reject(requeue=True)

        return self._pool.apply_async(
            apply_batches_task, (self, batch, 0, None), callback=on_return
        )
