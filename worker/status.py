"""Per-request status records in Redis: what `GET /connect/finish/{id}` reads.

The producer writes the first record and the dedupe claim (producer/claims.py); the worker
moves the state on from there.

Two keys per session:
- `hc:session:{hash}` -> JSON `{requestId, humanId, phase}`: the dedupe claim, written with
  the message in one atomic call (`phase` is `queued`; an older producer wrote `claimed`
  while it published).
- `hc:request:{requestId}` -> a hash with `state`, `humanId`, `clientUserId`, `error`,
  `publicToken` (Fernet ciphertext, never plaintext), `updatedAt`.

The database's `sessions` table stays the durable truth; these records are fast copies.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis

from worker.clock import now

#: Accepted requests not yet finished, scored by their last sign of progress (epoch seconds).
PENDING = "hc:pending"
STATES = ("queued", "running", "retrying", "succeeded", "failed")


def session_key(session_hash: str) -> str:
    return f"hc:session:{session_hash}"


def request_key(request_id: str) -> str:
    return f"hc:request:{request_id}"


def done_channel(request_id: str) -> str:
    return f"hc:done:{request_id}"


def new_request_id() -> str:
    """128 bits of randomness, URL-safe: the status it leads to carries a publicToken."""
    return secrets.token_urlsafe(16)


def set_state(r: redis.Redis, request_id: str, state: str, ttl_s: int, **fields: str) -> None:
    """Write a request's state and any extra fields, refreshing its expiry."""
    # No MULTI: nothing else writes this request's record meanwhile, and a transaction
    # doubles the replies to parse.
    pipe = r.pipeline(transaction=False)
    queue_state(pipe, request_id, state, ttl_s, **fields)
    pipe.execute()


def queue_state(pipe: Any, request_id: str, state: str, ttl_s: int, **fields: str) -> None:
    """`set_state`'s commands, added to a pipeline the caller executes."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    mapping: dict[Any, Any] = {"state": state, "updatedAt": now().isoformat(), **fields}
    pipe.hset(request_key(request_id), mapping=mapping)
    if state not in ("succeeded", "failed"):
        pipe.hdel(request_key(request_id), "error")
    pipe.expire(request_key(request_id), ttl_s)
    if state in ("succeeded", "failed"):
        pipe.hdel(request_key(request_id), "sealedSessionToken")
        pipe.zrem(PENDING, request_id)
        # Wakes a producer holding a `Prefer: wait` request for it.
        pipe.publish(done_channel(request_id), state)
    else:
        # Progress: the reconciler leaves a request alone while a worker is moving it on.
        pipe.zadd(PENDING, {request_id: time.time()})


def get_state(r: redis.Redis, request_id: str) -> dict[str, str] | None:
    """The stored status record, or None when unknown (or expired)."""
    raw = r.hgetall(request_key(request_id))
    if not raw:
        return None
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
