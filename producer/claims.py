"""Accepting a session in one atomic Redis call: the dedupe claim, the request's status
record, its pending entry and the exchange task's message, all or nothing.

The session's claim holds `{requestId, humanId, phase}` for the dedupe window. `phase` is
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

from producer.lanes import WaitingLane
from worker.clock import now
from worker.errors import BacklogFullError
from worker.redis_keys import (
    PENDING,
    QUEUE,
    WAITING_LANE,
    WAITING_QUEUE,
    request_status,
    session_claim,
)
from worker.request import ExchangeRequest
from worker.states import RequestState

# KEYS: session claim, request status, pending set, queue, waiting queue, waiting lane.
# ARGV: claim record, TTL, updatedAt, pending score, message, requestId, the message for the
#       waiting queue ('' when nobody waits), the lane's interval and tolerance (µs), the
#       backlog cap (0: none), then the request's record fields as name/value pairs
#       (ExchangeRequest.record_fields).
# Returns false when it queued the request, the existing claim for a session already
# accepted (a duplicate is answered whatever the backlog), or 0 when the backlog is full
# (nothing written). A waiting finish goes to the waiting queue while the lane has room
# (producer/lanes.py).
_ACCEPT = """
local existing = redis.call('GET', KEYS[1])
if existing then
  return existing
end
local cap = tonumber(ARGV[10])
if cap > 0 and redis.call('LLEN', KEYS[4]) + redis.call('LLEN', KEYS[5]) >= cap then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'queued', 'updatedAt', ARGV[3], unpack(ARGV, 11))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
local queue, message = KEYS[4], ARGV[5]
if ARGV[7] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local free = math.max(now, tonumber(redis.call('GET', KEYS[6]) or '0'))
  if free - now <= tonumber(ARGV[9]) then
    local after = free + tonumber(ARGV[8])
    redis.call('SET', KEYS[6], string.format('%.0f', after), 'PX',
      math.ceil((after - now) / 1000) + 1000)
    queue, message = KEYS[5], ARGV[7]
  end
end
redis.call('LPUSH', queue, message)
return false
"""

#: What the accept script returns when the backlog is at its cap.
BACKLOG_FULL = 0


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to accept a session."""

    request_id: str
    human_id: str
    phase: str
    #: True when this call accepted the session (and queued its message).
    mine: bool


class Claims:
    """Accept sessions and read their status records on one async Redis client."""

    def __init__(self, r: Redis, status_ttl_s: int, lane: WaitingLane, max_backlog: int = 0):
        self.r = r
        self.ttl = status_ttl_s
        self.lane = lane
        #: Sessions queued (both queues) at which new finishes are shed; 0: no cap.
        self.max_backlog = max_backlog
        # EVALSHA, falling back to EVAL: the script body crosses the wire once per server.
        self._accept = r.register_script(_ACCEPT)

    async def accept(
        self,
        session_hash: str,
        request: ExchangeRequest,
        message: str,
        waiting_message: str | None = None,
    ) -> Claim:
        """Claim the session and queue `message` for `request` (or `waiting_message` on the
        waiting queue, while its lane has room), or return the claim that exists."""
        record = json.dumps(
            {
                "requestId": request.request_id,
                "humanId": request.human_id,
                "phase": RequestState.QUEUED,
            }
        )
        fields = [v for pair in request.record_fields().items() for v in pair]
        existing = await self._accept(
            keys=[
                session_claim(session_hash),
                request_status(request.request_id),
                PENDING,
                QUEUE,
                WAITING_QUEUE,
                WAITING_LANE,
            ],
            args=[
                record,
                self.ttl,
                now().isoformat(),
                time.time(),
                message,
                request.request_id,
                waiting_message or "",
                self.lane.interval_us,
                self.lane.tolerance_us,
                self.max_backlog,
                *fields,
            ],
        )
        if existing == BACKLOG_FULL:
            raise BacklogFullError(f"{self.max_backlog} sessions queued")
        if not existing:
            return Claim(request.request_id, request.human_id, RequestState.QUEUED, mine=True)
        data = json.loads(existing)
        # Our own request id: a retry of this very call whose first reply was lost.
        mine = data["requestId"] == request.request_id
        return Claim(data["requestId"], data["humanId"], data["phase"], mine=mine)

    async def state(self, request_id: str) -> dict[str, str] | None:
        """A request's status record, or None when unknown (or expired)."""
        raw = await self.r.hgetall(request_status(request_id))
        return {str(k): str(v) for k, v in raw.items()} if raw else None
