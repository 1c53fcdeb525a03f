"""Accepting a session in one atomic Redis call: the dedupe claim, the request's status
record, its pending entry and the exchange task's message, all or nothing.

The session's claim holds its requestId and a digest of its humanId for the dedupe window
(humanconnect/status_records.py has its form). The claim and the
enqueue are one script, so there is no moment where a session is claimed but not yet queued.
The first status record is written in the same call, so a fast worker's `running` is never
overwritten by the producer's `queued`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from humanconnect.clock import now
from humanconnect.rate import Rate, script_args
from humanconnect.redis_keys import (
    PENDING,
    QUEUE,
    REPLICATION_MARK,
    WAITING_LANE,
    WAITING_QUEUE,
    finish_limit,
    request_status,
)
from humanconnect.redis_settings import wait_seconds
from humanconnect.request import ExchangeRequest
from humanconnect.states import RequestState
from humanconnect.status_records import claim_value, read_claim
from producer.errors import BacklogFullError, NotReplicatedError, OverLimitError, RedisFullError
from producer.lanes import WaitingLane
from producer.lean_script import LeanScript
from producer.memory import MemoryWatch
from producer.message import RECEIVED_MARKER

# KEYS: session claim, request status, pending set, queue, waiting queue, waiting lane, the
#       client address's limit, the ticket user's limit, the replication mark.
# ARGV: claim record, TTL, updatedAt, the receive-time marker, message, requestId, the message
#       for the waiting queue ('' when nobody waits), the lane's interval and tolerance (µs),
#       the backlog cap (0: none), each limit's interval and tolerance (µs; interval 0: no
#       limit), '1' when Redis's memory is near its maxmemory (producer/memory.py), '1' when
#       the answer waits for replicas, then the request's record fields as name/value pairs
#       (ExchangeRequest.record_fields).
# Returns false when it queued the request; the existing claim for a session already
# accepted (a duplicate is answered whatever the limits and the backlog); {'limited', which
# (0: address, 1: user), µs until it may send again} over a limit; 0 when the backlog is
# full, {'memory'} when Redis's memory is. Refused, it writes nothing. A duplicate whose
# answer waits for replicas publishes the mark: WAIT counts the replicas that hold this
# connection's last replicated command, and the mark, sent after the claim it found, makes
# that cover the claim whichever connection wrote it. A PUBLISH, not a key: Redis takes it
# at its maxmemory too, and a duplicate is answered whatever Redis's memory. A waiting finish goes
# to the waiting queue while the lane has room (producer/lanes.py).
#
# The receive time that decides which session's tokens win is Redis's clock, read here: one
# clock for every web host. The message carries a marker in its place (the body is plain
# JSON: see producer/message.py), replaced with it before the push.
_ACCEPT = """
local existing = redis.call('GET', KEYS[1])
if existing then
  if ARGV[16] == '1' then
    redis.call('PUBLISH', KEYS[9], '')
  end
  return existing
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local due = {}
for i = 0, 1 do
  local interval = tonumber(ARGV[11 + 2 * i])
  if interval > 0 then
    local tat = math.max(now, tonumber(redis.call('GET', KEYS[7 + i]) or '0'))
    local early = tat - now - tonumber(ARGV[12 + 2 * i])
    if early > 0 then
      return {'limited', i, early}
    end
    due[7 + i] = tat + interval
  end
end
if ARGV[15] == '1' then
  return {'memory'}
end
local cap = tonumber(ARGV[10])
if cap > 0 and redis.call('LLEN', KEYS[4]) + redis.call('LLEN', KEYS[5]) >= cap then
  return 0
end
-- Stamped after the refusals (nothing to do for a refused finish) and before anything is
-- written: a message without its marker fails whole.
local received = string.format('%.0f', now)
local function stamped(message)
  if message == '' then
    return message
  end
  local first, last = string.find(message, ARGV[4], 1, true)
  if not first then
    error('the message has no receive-time marker')
  end
  -- The marker ends in its placeholder value, -1.
  return string.sub(message, 1, last - 2) .. received .. string.sub(message, last + 1)
end
local ordinary, waiting = stamped(ARGV[5]), stamped(ARGV[7])
for key, tat in pairs(due) do
  redis.call('SET', KEYS[key], string.format('%.0f', tat), 'PX',
    math.ceil((tat - now) / 1000) + 1)
end
local queue, message = KEYS[4], ordinary
if waiting ~= '' then
  local free = math.max(now, tonumber(redis.call('GET', KEYS[6]) or '0'))
  if free - now <= tonumber(ARGV[9]) then
    local after = free + tonumber(ARGV[8])
    redis.call('SET', KEYS[6], string.format('%.0f', after), 'PX',
      math.ceil((after - now) / 1000) + 1000)
    queue, message = KEYS[5], waiting
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'queued', 'updatedAt', ARGV[3], unpack(ARGV, 17))
redis.call('HSET', KEYS[2], 'receivedUs', received)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], string.format('%.6f', now / 1000000), ARGV[6])
redis.call('LPUSH', queue, message)
return false
"""

# KEYS: a claim. ARGV: its value as read.
_DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: What the accept script returns when the backlog is at its cap.
BACKLOG_FULL = 0
#: The first item of what it returns when a source is over its limit.
LIMITED = "limited"
#: What it returns when Redis's memory is near full.
MEMORY_FULL = "memory"
#: A limit's source, by its place in the script.
SOURCES = ("ip", "user")


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to accept a session."""

    request_id: str
    #: Whether the session was accepted with the humanId of this call.
    same_human: bool
    #: True when this call accepted the session (and queued its message).
    mine: bool
    #: How the claimed request ended, if it has and its worker marked the claim.
    final: RequestState | None = None
    #: The claim as stored ("" for one this call wrote).
    raw: str = ""


class Claims:
    """Accept sessions and read their status records on one async Redis client."""

    def __init__(
        self,
        r: Redis,
        status_ttl_s: int,
        lane: WaitingLane,
        max_backlog: int = 0,
        per_ip: Rate | None = None,
        per_user: Rate | None = None,
        memory: MemoryWatch | None = None,
        replica_wait: tuple[int, int] = (0, 0),
    ):
        self.r = r
        self.ttl = status_ttl_s
        self.lane = lane
        #: Sessions queued (both queues) at which new finishes are shed; 0: no cap.
        self.max_backlog = max_backlog
        self.limits = (per_ip, per_user)
        self.memory = memory
        #: Replicas that must hold an accept before it is answered, and how long to wait for
        #: them (Redis WAIT's arguments); (0, _): none.
        self.replicas, self.replica_timeout_ms = replica_wait
        # EVALSHA, loading the script again when Redis lost it: the body crosses the wire once
        # per server. Called lean: the one Redis call of every finish (producer/lean_script.py).
        self._accept = LeanScript(r, _ACCEPT)
        #: When the last accept began (time.monotonic()): the connection keeper waits for a
        #: quiet moment after it.
        self.last_accept = 0.0

    async def preload(self) -> None:
        """Load the accept script into Redis, so no finish meets NOSCRIPT (a restarted Redis
        has none)."""
        await self._accept.load()

    async def accept(
        self,
        claim_key: str,
        request: ExchangeRequest,
        message: str,
        waiting_message: str | None = None,
        *,
        client: str = "",
        user: str | None = None,
        claim_names: str | None = None,
    ) -> Claim:
        """Claim the session (`claim_key`: its `session_claim`, or an access finish's
        `access_claim`) and queue `message` for `request` (or `waiting_message` on the
        waiting queue, while its lane has room), or return the claim that exists. `user` (a
        valid ticket's) is counted against the per-user limit; without one, `client` (its
        address) against the per-address limit.

        Raises OverLimitError or BacklogFullError when it refused the finish, and
        NotReplicatedError when too few replicas hold what it found or wrote."""
        self.last_accept = time.monotonic()
        # The claim's digest is of the humanId, or of what `claim_names` gives instead (an
        # access finish's connected sources).
        record = claim_value(request.request_id, claim_names or request.human_id)
        fields = [v for pair in request.record_fields().items() for v in pair]
        existing, replicated = await self._run(
            [
                claim_key,
                request_status(request.request_id),
                PENDING,
                QUEUE,
                WAITING_QUEUE,
                WAITING_LANE,
                finish_limit("ip", client),
                finish_limit("user", user or ""),
                REPLICATION_MARK,
            ],
            [
                record,
                self.ttl,
                now().isoformat(),
                RECEIVED_MARKER,
                message,
                request.request_id,
                waiting_message or "",
                self.lane.interval_us,
                self.lane.tolerance_us,
                self.max_backlog,
                # A ticketed finish counts against its user alone: the app's server vouched
                # for that user, and a crowd behind one address (an office NAT, a carrier's
                # CGNAT), each with their own ticket, must not share one address's limit.
                *script_args(self.limits[0] if not user else None),
                *script_args(self.limits[1] if user else None),
                "1" if self.memory and self.memory.full else "0",
                "1" if self.replicas else "0",
                *fields,
            ],
        )
        if isinstance(existing, list) and existing[0] == LIMITED:
            raise OverLimitError(SOURCES[int(existing[1])], int(existing[2]) / 1e6)
        if isinstance(existing, list) and existing[0] == MEMORY_FULL:
            raise RedisFullError("redis memory near its maxmemory")
        if existing == BACKLOG_FULL:
            raise BacklogFullError(f"{self.max_backlog} sessions queued")
        if not replicated:
            raise NotReplicatedError(f"fewer than {self.replicas} replicas hold the accept")
        if not existing:
            return Claim(request.request_id, same_human=True, mine=True)
        found = read_claim(existing)
        # Our own request id: a retry of this very call whose first reply was lost.
        mine = found.request_id == request.request_id
        names = found.names(claim_names or request.human_id)
        return Claim(found.request_id, names, mine, found.final, str(existing))

    async def drop(self, claim_key: str, raw: str) -> None:
        """Delete a claim if it still reads `raw`."""
        await self.r.eval(_DROP, 1, claim_key, raw)

    @property
    def replica_wait_s(self) -> float:
        """The longest an accept waits for its replicas (0 when it waits for none)."""
        return wait_seconds((self.replicas, self.replica_timeout_ms))

    async def _run(self, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        """The accept script's reply, and whether enough replicas hold what it wrote."""
        if not self.replicas:
            return await self._accept(keys, args), True
        # WAIT counts the replicas holding the writes of the connection it is sent on: a
        # pipeline sends both on one. EVALSHA by hand, not through the Script object, whose
        # pipeline path asks SCRIPT EXISTS first (a round trip on every finish).
        for attempt in range(2):
            pipe = self.r.pipeline(transaction=False)
            pipe.evalsha(self._accept.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.replicas, self.replica_timeout_ms)
            reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 0:
                # A promoted replica, or a restarted Redis: scripts are not replicated.
                await self.r.script_load(_ACCEPT)
                continue
            for result in (reply, acked):
                if isinstance(result, Exception):
                    raise result
            break
        return reply, int(acked) >= self.replicas

    async def state(self, request_id: str) -> dict[str, str] | None:
        """A request's status record, or None when unknown (or expired)."""
        raw = await self.r.hgetall(request_status(request_id))
        return {str(k): str(v) for k, v in raw.items()} if raw else None
