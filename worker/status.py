"""Per-request status records in Redis: what `GET /connect/finish/{id}` reads.

Two keys per session:
- `hc:session:{hash}` -> JSON `{requestId, humanId, phase}`: the dedupe claim. `phase` is
  `claimed` while the producer is enqueueing and `queued` once the broker has the message.
- `hc:request:{requestId}` -> a hash with `state`, `humanId`, `clientUserId`, `error`,
  `publicToken` (Fernet ciphertext, never plaintext), `updatedAt`.

The database's `sessions` table stays the durable truth; these records are fast copies.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from worker.clock import now

STATES = ("queued", "running", "retrying", "succeeded", "failed")
# A claim that is never confirmed (the producer died mid-enqueue) frees itself this fast.
CLAIM_TTL_S = 15


def session_key(session_hash: str) -> str:
    return f"hc:session:{session_hash}"


def request_key(request_id: str) -> str:
    return f"hc:request:{request_id}"


def new_request_id() -> str:
    """128 bits of randomness, URL-safe: the status it leads to carries a publicToken."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to claim a session for enqueueing."""

    request_id: str
    human_id: str
    phase: str
    #: True when this caller made the claim and must now enqueue (or release it).
    mine: bool


def claim(r: redis.Redis, session_hash: str, human_id: str, ttl_s: int) -> Claim:
    """Claim a session for enqueueing, or return the claim that already exists.

    The request's status record is written with the claim, before the message is sent, so a
    fast worker's `running` is never overwritten by the producer's `queued`.
    """
    request_id = new_request_id()
    record = json.dumps({"requestId": request_id, "humanId": human_id, "phase": "claimed"})
    pipe = r.pipeline(transaction=True)
    pipe.set(session_key(session_hash), record, nx=True, ex=CLAIM_TTL_S)
    got = pipe.execute()[0]
    if got:
        set_state(r, request_id, "queued", ttl_s, humanId=human_id)
        return Claim(request_id, human_id, "claimed", mine=True)
    existing = r.get(session_key(session_hash))
    if existing is None:
        # Released between our SET and GET: try once more.
        return claim(r, session_hash, human_id, ttl_s)
    data = json.loads(existing)
    return Claim(data["requestId"], data["humanId"], data["phase"], mine=False)


def confirm(r: redis.Redis, session_hash: str, claim_: Claim, ttl_s: int) -> None:
    """Mark a claim as safely queued, keeping it for the dedupe window."""
    record = json.dumps(
        {"requestId": claim_.request_id, "humanId": claim_.human_id, "phase": "queued"}
    )
    r.set(session_key(session_hash), record, ex=ttl_s)


def release(r: redis.Redis, session_hash: str, claim_: Claim) -> None:
    """Undo a claim whose enqueue failed: nothing half-accepted stays behind."""
    pipe = r.pipeline(transaction=True)
    pipe.delete(session_key(session_hash))
    pipe.delete(request_key(claim_.request_id))
    pipe.execute()


def wait_confirmed(
    r: redis.Redis, session_hash: str, human_id: str, ttl_s: int, timeout_s: float
) -> Claim | None:
    """Wait for another request's claim to be confirmed; claim it ourselves if it vanished."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = claim(r, session_hash, human_id, ttl_s)
        if current.mine or current.phase == "queued" or current.human_id != human_id:
            return current
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def set_state(r: redis.Redis, request_id: str, state: str, ttl_s: int, **fields: str) -> None:
    """Write a request's state and any extra fields, refreshing its expiry."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    mapping: dict[Any, Any] = {"state": state, "updatedAt": now().isoformat(), **fields}
    pipe = r.pipeline(transaction=True)
    pipe.hset(request_key(request_id), mapping=mapping)
    if state not in ("succeeded", "failed"):
        pipe.hdel(request_key(request_id), "error")
    pipe.expire(request_key(request_id), ttl_s)
    pipe.execute()


def get_state(r: redis.Redis, request_id: str) -> dict[str, str] | None:
    """The stored status record, or None when unknown (or expired)."""
    raw = r.hgetall(request_key(request_id))
    if not raw:
        return None
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
