"""One outbound limit to the upstream, shared by every worker process through Redis.

A Celery `rate_limit` is per worker; this one is global (a moving window in Redis, by the
`limits` library), so adding workers never multiplies the load on the provider.
"""

from __future__ import annotations

import math
import random
import time

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from worker.clock import now
from worker.redis_keys import UPSTREAM_LIMIT as KEY


def rate_item(max_rps: float) -> RateLimitItem:
    """`max_rps` as a whole number of calls per whole number of seconds."""
    if max_rps >= 1:
        return RateLimitItemPerSecond(max(1, math.floor(max_rps)), 1)
    return RateLimitItemPerSecond(1, max(1, round(1 / max_rps)))


class GlobalRateLimiter:
    """Block the calling thread until the shared window has room for one more call."""

    def __init__(self, redis_url: str, max_rps: float):
        self._limiter = MovingWindowRateLimiter(RedisStorage(redis_url))
        self._item = rate_item(max_rps)

    def acquire(self, timeout: float = 60.0) -> float:
        """Take one slot; return the seconds spent waiting. Raises TimeoutError past `timeout`."""
        started = time.monotonic()
        while True:
            if self._limiter.hit(self._item, KEY):
                return time.monotonic() - started
            waited = time.monotonic() - started
            if waited >= timeout:
                raise TimeoutError("upstream rate limit: no slot in time")
            stats = self._limiter.get_window_stats(self._item, KEY)
            until_reset = stats.reset_time - now().timestamp()
            # Jitter spreads the waiting threads so they don't all retry on the same tick.
            time.sleep(min(max(until_reset, 0.005), 0.25) * (0.5 + random.random()))
