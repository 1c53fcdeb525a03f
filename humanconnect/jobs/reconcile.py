"""The safety net under the broker: re-send accepted requests that stopped making progress.

Redis's Celery transport pops a message and records it as unacked in two steps; a worker
SIGKILLed between them loses that message. Every
accepted request is therefore also in the sorted set `hc:pending`, scored by its last sign of
progress; one with none for `Settings.reconcile_after_s` is sent again under the
same request id. A duplicate is harmless: the session lock and the `sessions` record make it
a no-op.

A request still waiting in the queue is not lost, however long the backlog: only requests
older than the next message the workers will take are looked at, so a deep queue never
fills itself with re-sends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

import redis

from humanconnect.redis_keys import PENDING
from humanconnect.request import ExchangeRequest
from humanconnect.states import RequestState
from humanconnect.status_records import get_state

log = logging.getLogger(__name__)


# How many of the next messages in the queue are read to find where the backlog stands.
PEEK = 20


def requeue_stale(
    r: redis.Redis,
    send: Callable[[ExchangeRequest], None],
    *,
    stale_s: float,
    queues: Sequence[str] = (),
    limit: int = 1000,
) -> int:
    """Re-send up to `limit` requests with no progress for `stale_s` that are no longer
    waiting in any of `queues` (the broker's lists); returns how many."""
    now_s = time.time()
    cutoff = now_s - stale_s
    for queue in queues:
        head = _backlog_head(r, queue)
        if head is None:
            return 0
        cutoff = min(cutoff, head)
    sent = 0
    for raw in r.zrangebyscore(PENDING, 0, f"({cutoff}", start=0, num=limit):
        request_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        record = get_state(r, request_id) or {}
        request = ExchangeRequest.from_record(request_id, record)
        if record.get("state") in (RequestState.SUCCEEDED, RequestState.FAILED) or not request:
            r.zrem(PENDING, request_id)
            continue
        send(request)
        r.zadd(PENDING, {request_id: now_s})
        sent += 1
    if sent:
        log.warning("re-sent %d requests that made no progress for %.0f s", sent, stale_s)
    return sent


def _backlog_head(r: redis.Redis, queue: str) -> float | None:
    """The pending score of the next exchange the workers will take from `queue` (anything
    at or after it is still waiting, not lost); +inf when the queue is empty; None when
    the next messages can't be placed (then nothing is re-sent this pass)."""
    waiting = r.lrange(queue, -PEEK, -1)
    if not waiting:
        return float("inf")
    # The Redis transport pushes on the left and pops on the right: the last is next.
    for raw in reversed(waiting):
        try:
            task_id = json.loads(raw)["headers"]["id"]
        except (ValueError, KeyError, TypeError):
            continue
        score = r.zscore(PENDING, task_id)
        if score is not None:
            return float(score)
    return None
