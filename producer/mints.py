"""Asking a worker to mint a current-flow token, and waiting for it (at most 10 s).

The web holds no clientSecret, so `POST /connect/token` and an expired access token's read
queue a `mint_token` task (humanconnect/minting.py) on the waiting queue, which workers
take before queued work. One script call starts a mint unless one of this user and kind is
in flight (its id under the flight key), in which case this request waits on that one: a
burst of tabs, or 50 reads of one expired token, is one upstream call.
"""

from __future__ import annotations

import asyncio
import time

import redis
from redis.asyncio import Redis

# A flight outlives the wait, so a person sent away with a `503` who asks again waits on the
# same mint; a worker killed mid-mint lets the next ask start another once it lapses.
from humanconnect.minting import FLIGHT_TTL_S, MintKind, MintState
from humanconnect.rate import Rate, script_args
from humanconnect.redis_keys import WAITING_QUEUE, mint_flight, mint_limit, mint_result
from humanconnect.status_records import new_request_id
from producer.accept import within
from producer.message import MessageBuilder
from producer.waiters import Waiters

#: The longest a person waits for a mint before a `503`: someone is looking at a page.
MINT_WAIT_S = 10.0
#: Longest wait for Redis to answer the start (as a finish's accept).
START_DEADLINE_S = 1.0

# KEYS: the flight key, the waiting queue, the user's mint limit. ARGV: the new mint's id, the
# flight's TTL, its message, the limit's interval and tolerance (µs; interval 0: no limit).
# Returns the mint in flight (false when this call started it), or {'limited', µs until the
# user may start another}. Joining a mint in flight is free: only a start is counted, by the
# GCRA of the finish limits (humanconnect/rate.py), and a refused start writes nothing.
_START = """
local flying = redis.call('GET', KEYS[1])
if flying then return flying end
local interval = tonumber(ARGV[4])
if interval > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local tat = math.max(now, tonumber(redis.call('GET', KEYS[3]) or '0'))
  local early = tat - now - tonumber(ARGV[5])
  if early > 0 then return {'limited', early} end
  redis.call('SET', KEYS[3], string.format('%.0f', tat + interval), 'PX',
    math.ceil((tat + interval - now) / 1000) + 1)
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[3])
return false
"""


class MintUnavailable(Exception):
    """Raised when no token came within the wait, or the provider could not be reached."""


class MintRefused(Exception):
    """Raised when the provider refused to mint (its reason, no secret, in the message)."""


class MintLimited(Exception):
    """Raised when the user has started as many mints as the per-user limit allows."""

    def __init__(self, retry_after_s: float):
        super().__init__("over the per-user mint limit")
        self.retry_after_s = retry_after_s


class Mints:
    """Starts mints and waits for them, on the web's async Redis client."""

    def __init__(
        self,
        r: Redis,
        messages: MessageBuilder,
        waiters: Waiters,
        per_user: Rate | None = None,
    ):
        self.r = r
        self.messages = messages
        self.waiters = waiters
        #: How many Connect mints one ticket user may start (HUMANCONNECT_FINISH_LIMIT_PER_USER):
        #: a page looping on a refused user must not spend the upstream's calls.
        self.per_user = per_user
        self._start = r.register_script(_START)

    async def mint(self, user: str, kind: MintKind, email: str | None = None) -> None:
        """Return once a mint of `kind` for `user` has ended well (the caller then reads
        what it kept); raise MintUnavailable, MintRefused or (a Connect mint the user may not
        start yet) MintLimited otherwise."""
        deadline = time.monotonic() + MINT_WAIT_S
        mint_id = new_request_id()
        message = self.messages.mint(mint_id, user, kind, email)
        # The app's server reads access tokens with its API token: only a person's asks count.
        limit = self.per_user if kind is MintKind.CONNECT else None
        try:
            flying = await within(
                self._start(
                    keys=[mint_flight(kind, user), WAITING_QUEUE, mint_limit(user)],
                    args=[mint_id, FLIGHT_TTL_S, message, *script_args(limit)],
                ),
                START_DEADLINE_S,
            )
        except (redis.exceptions.RedisError, TimeoutError) as exc:
            raise MintUnavailable(f"redis unavailable: {type(exc).__name__}") from None
        if isinstance(flying, list):
            raise MintLimited(int(flying[1]) / 1_000_000)
        # The web's client decodes replies: `flying` is the mint in flight's id, or None.
        await self._wait(flying or mint_id, deadline)

    async def _wait(self, mint_id: str, deadline: float) -> None:
        async with self.waiters.waiting(mint_id) as done:
            while True:
                try:
                    result = await within(self.r.hgetall(mint_result(mint_id)), 1.0)
                except (redis.exceptions.RedisError, TimeoutError):
                    result = {}
                state = result.get("state", "")
                if state == MintState.OK:
                    return
                if state == MintState.REFUSED:
                    raise MintRefused(result.get("error", ""))
                if state == MintState.UNAVAILABLE:
                    raise MintUnavailable("the provider could not be reached")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MintUnavailable("no token within the wait")
                if done.done():  # woken, yet no result to read (Redis hiccuped): look again soon
                    await asyncio.sleep(min(0.2, remaining))
                    continue
                # Woken by the worker's publish; the slices only cover a missed message.
                try:
                    await asyncio.wait_for(asyncio.shield(done), min(1.0, remaining))
                except TimeoutError:
                    pass
