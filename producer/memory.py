"""Watching Redis's memory, so finishes are shed while the workers still have room to drain.

A Redis at its `maxmemory` (with noeviction, as it must be) refuses every write that may
grow it: the accept script, but also the workers' own writes (Kombu's note of a message in
flight, a status update, an event), and a Celery worker exits on that error. So the web stops
taking new finishes a little before: with less than `HEADROOM` of `maxmemory` left (or
`MIN_HEADROOM_BYTES`, if more), by a reading of `INFO memory` every `INTERVAL_S` (not one per
finish: INFO costs more than the accept itself). The rest is the workers' room: their
connections' buffers alone take hundreds of KB when 32 threads start at once (seen in
tests/test_shedding.py). An accept that still meets Redis's OOM is shed all the same.
"""

from __future__ import annotations

import logging

import redis
from redis.asyncio import Redis

from producer.periodic import Periodic

log = logging.getLogger(__name__)

#: The share of maxmemory kept for the workers: new finishes are shed inside it.
HEADROOM = 0.1
#: ... but never less than this.
MIN_HEADROOM_BYTES = 16 * 1024 * 1024
#: How often the web reads Redis's memory.
INTERVAL_S = 0.25


class MemoryWatch(Periodic):
    """`full` is true while Redis's free memory is within its headroom."""

    def __init__(self, r: Redis, interval_s: float = INTERVAL_S):
        super().__init__(interval_s)
        self.r = r
        self.full = False

    async def read(self) -> None:
        """Take one reading (a Redis without maxmemory is never full)."""
        info = await self.r.info("memory")
        limit = int(info.get("maxmemory", 0))
        headroom = max(HEADROOM * limit, MIN_HEADROOM_BYTES)
        full = limit > 0 and limit - int(info["used_memory"]) < headroom
        if full != self.full:
            log.warning(
                "redis memory %s %d MiB of its maxmemory: %s new finishes",
                "within" if full else "no longer within",
                headroom // 2**20,
                "shedding" if full else "taking",
            )
        self.full = full

    async def round(self) -> None:
        try:
            await self.read()
        except redis.exceptions.RedisError:
            pass  # Redis away: the accept call itself answers 503; keep the last reading
