"""The producer's dedupe claims in Redis, async so the event loop never waits on a thread.

`hc:session:{hash}` holds `{requestId, humanId, phase}`: `claimed` while one request is
enqueueing, `queued` once the broker has the message. The request's first status record is
written in the same round trip as the claim, so a fast worker's `running` is never
overwritten by the producer's `queued`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from worker.clock import now
from worker.status import PENDING, new_request_id, request_key, session_key

# A claim that is never confirmed (the producer died mid-enqueue) frees itself this fast.
CLAIM_TTL_S = 15

# KEYS: session key, request key. ARGV: claim record, claim TTL, humanId, updatedAt, status TTL.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('HSET', KEYS[2], 'state', 'queued', 'humanId', ARGV[3], 'updatedAt', ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  return false
end
return redis.call('GET', KEYS[1])
"""


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to claim a session for enqueueing."""

    request_id: str
    human_id: str
    phase: str
    #: True when this caller made the claim and must now enqueue (or release it).
    mine: bool


class Claims:
    """Claim, confirm and release sessions on one async Redis client."""

    def __init__(self, r: Redis, status_ttl_s: int):
        self.r = r
        self.ttl = status_ttl_s
        # EVALSHA, falling back to EVAL: the script body crosses the wire once per server.
        self._claim = r.register_script(_CLAIM)

    async def claim(self, session_hash: str, human_id: str) -> Claim:
        """Claim a session for enqueueing, or return the claim that already exists."""
        request_id = new_request_id()
        record = json.dumps({"requestId": request_id, "humanId": human_id, "phase": "claimed"})
        existing = await self._claim(
            keys=[session_key(session_hash), request_key(request_id)],
            args=[record, CLAIM_TTL_S, human_id, now().isoformat(), self.ttl],
        )
        if not existing:
            return Claim(request_id, human_id, "claimed", mine=True)
        data = json.loads(existing)
        return Claim(data["requestId"], data["humanId"], data["phase"], mine=False)

    async def confirm(self, session_hash: str, claim: Claim, message: dict[Any, Any]) -> None:
        """Mark a claim as safely queued, keeping it for the dedupe window, and keep what a
        re-send needs (see worker/reconcile.py) with the request, pending until it ends."""
        record = json.dumps(
            {"requestId": claim.request_id, "humanId": claim.human_id, "phase": "queued"}
        )
        pipe = self.r.pipeline(transaction=True)
        pipe.set(session_key(session_hash), record, ex=self.ttl)
        pipe.hset(request_key(claim.request_id), mapping=message)
        pipe.zadd(PENDING, {claim.request_id: time.time()})
        await pipe.execute()

    async def release(self, session_hash: str, claim: Claim) -> None:
        """Undo a claim whose enqueue failed: nothing half-accepted stays behind."""
        await self.r.delete(session_key(session_hash), request_key(claim.request_id))

    async def wait_confirmed(
        self, session_hash: str, human_id: str, timeout_s: float
    ) -> Claim | None:
        """Wait for another request's claim to be confirmed; claim it ourselves if it vanished."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = await self.claim(session_hash, human_id)
            if current.mine or current.phase == "queued" or current.human_id != human_id:
                return current
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.02)

    async def state(self, request_id: str) -> dict[str, str] | None:
        """A request's status record, or None when unknown (or expired)."""
        raw = await self.r.hgetall(request_key(request_id))
        return {str(k): str(v) for k, v in raw.items()} if raw else None
