"""The safety net under the broker: re-send accepted requests that stopped making progress.

Redis's Celery transport pops a message and records it as unacked in two steps; a worker
SIGKILLed between them loses that message (the chaos test saw one in 300, each kill). Every
accepted request is therefore also in the sorted set `hc:pending`, scored by its last sign of
progress; one with none for `STALE_S` is sent again under the same request id. A duplicate
is harmless: the session lock and the `sessions` record make it a no-op.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from worker.status import PENDING, get_state

log = logging.getLogger(__name__)

# Longer than any countdown (60 s) plus a prefetched message's wait; short enough that a
# lost session is sent again well within 5 minutes of a worker running.
STALE_S = 150.0


def requeue_stale(
    r: redis.Redis,
    send: Callable[[dict[str, Any]], None],
    *,
    stale_s: float = STALE_S,
    limit: int = 1000,
) -> int:
    """Re-send up to `limit` requests with no progress for `stale_s`; returns how many."""
    now_s = time.time()
    sent = 0
    for raw in r.zrangebyscore(PENDING, 0, now_s - stale_s, start=0, num=limit):
        request_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        record = get_state(r, request_id) or {}
        if record.get("state") in ("succeeded", "failed") or "sealedSessionToken" not in record:
            r.zrem(PENDING, request_id)
            continue
        kwargs: dict[str, Any] = {
            "request_id": request_id,
            "human_id": record["humanId"],
            "client_id": record["clientId"],
            "sealed_session_token": record["sealedSessionToken"],
            "received_us": int(record["receivedUs"]),
        }
        if "windowStartUs" in record:  # re-queued by `humanconnect failed --retry`
            kwargs["window_start_us"] = int(record["windowStartUs"])
        send(kwargs)
        r.zadd(PENDING, {request_id: now_s})
        sent += 1
    if sent:
        log.warning("re-sent %d requests that made no progress for %.0f s", sent, stale_s)
    return sent
