"""Accepting a session in one atomic Redis call: the dedupe claim, the request's status
record, its pending entry and the exchange task's message, all or nothing.

`hc:session:{hash}` holds `{requestId, humanId, phase}` for the dedupe window. `phase` is
always `queued` now: the claim and the enqueue are one script, so there is no moment where a
session is claimed but not yet queued (an older producer, during a rolling upgrade, writes
`claimed` while it publishes; see producer/accept.py). The first status record is written in
the same call, so a fast worker's `running` is never overwritten by the producer's `queued`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from worker.celery import QUEUE
from worker.clock import now
from worker.status import PENDING, request_key, session_key

# KEYS: session key, request key, pending set, queue.
# ARGV: claim record, TTL, humanId, updatedAt, clientId, sealed session token, receivedUs,
#       pending score, message, requestId.
_ACCEPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('HSET', KEYS[2], 'state', 'queued', 'humanId', ARGV[3], 'updatedAt', ARGV[4],
             'clientId', ARGV[5], 'sealedSessionToken', ARGV[6], 'receivedUs', ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[8], ARGV[10])
  redis.call('LPUSH', KEYS[4], ARGV[9])
  return false
end
return redis.call('GET', KEYS[1])
"""


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to accept a session."""

    request_id: str
    human_id: str
    phase: str
    #: True when this call accepted the session (and queued its message).
    mine: bool


@dataclass(frozen=True)
class Pending:
    """What the accept script stores with a new request: a re-send needs all of it
    (see worker/reconcile.py)."""

    human_id: str
    client_id: str
    sealed_session_token: str
    received_us: int


class Claims:
    """Accept sessions and read their status records on one async Redis client."""

    def __init__(self, r: Redis, status_ttl_s: int):
        self.r = r
        self.ttl = status_ttl_s
        # EVALSHA, falling back to EVAL: the script body crosses the wire once per server.
        self._accept = r.register_script(_ACCEPT)

    async def accept(self, session_hash: str, request_id: str, p: Pending, message: str) -> Claim:
        """Claim the session and queue `message` for it, or return the claim that exists."""
        record = json.dumps({"requestId": request_id, "humanId": p.human_id, "phase": "queued"})
        existing = await self._accept(
            keys=[session_key(session_hash), request_key(request_id), PENDING, QUEUE],
            args=[
                record,
                self.ttl,
                p.human_id,
                now().isoformat(),
                p.client_id,
                p.sealed_session_token,
                p.received_us,
                time.time(),
                message,
                request_id,
            ],
        )
        if not existing:
            return Claim(request_id, p.human_id, "queued", mine=True)
        data = json.loads(existing)
        # Our own request id: a retry of this very call whose first reply was lost.
        mine = data["requestId"] == request_id
        return Claim(data["requestId"], data["humanId"], data["phase"], mine=mine)

    async def state(self, request_id: str) -> dict[str, str] | None:
        """A request's status record, or None when unknown (or expired)."""
        raw = await self.r.hgetall(request_key(request_id))
        return {str(k): str(v) for k, v in raw.items()} if raw else None
