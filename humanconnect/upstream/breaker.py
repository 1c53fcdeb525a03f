"""A circuit breaker on the upstream, shared by every worker process through Redis.

When the upstream answers (almost) nothing but 5xx, timeouts and refused connections, a
thousand sessions retrying on their own schedules still call it at the full rate limit for
as long as the outage lasts. The breaker opens instead: for a cool-off (2 s, doubling up to
30 s while the outage lasts) every delivery goes back to the queue without a call. When the
cool-off ends, calls resume; if they fail again it re-opens for twice as long, and the first
success resets it.

Failures are counted in 10-second windows, successes over the last one to two seconds (the
current second's count and the one before). The breaker opens on at least `THRESHOLD`
failures in a window with a failure rate five times the success rate, so a few faults under
load never trip it. (Successes were once counted in a fixed 2-second window: the first
failure after it expired saw no successes at all, so a 30 % fault rate at a steady pace
tripped the breaker at random, as tests/test_repair.py did now and then.) A success is
counted inside the exchange's own final Redis round trip (`queue_success`), and the
breaker's state is read from Redis at most every `CHECK_S` per process: the healthy path
pays no extra round trip.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from humanconnect.clock import now_us
from humanconnect.redis_keys import BREAKER_FAILS as FAILS
from humanconnect.redis_keys import BREAKER_LEVEL as LEVEL
from humanconnect.redis_keys import BREAKER_OKS as OKS
from humanconnect.redis_keys import BREAKER_OPEN as OPEN

# Failures are counted over 10 s, so a slow failure (a hung call cut at the read timeout)
# still adds up; successes over the last 1-2 s only (two one-second counts), so a busy
# healthy spell's successes can't hold the breaker closed through an outage.
FAIL_WINDOW_S = 10
OK_WINDOW_S = 2
# "Five times more failures than successes", as rates over those windows.
RATIO = 5 * FAIL_WINDOW_S // OK_WINDOW_S
THRESHOLD = 20
FIRST_COOL_OFF_S = 2.0
MAX_COOL_OFF_S = 30.0
CHECK_S = 0.5

# KEYS: fails, open, level, this second's successes, the last second's.
# ARGV: fail window, threshold, first cool-off ms, max cool-off ms, ratio.
# Returns the cool-off in ms when this failure opened the breaker, else 0.
FAILURE_SCRIPT = """
local fails = redis.call('INCR', KEYS[1])
if fails == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local oks = tonumber(redis.call('GET', KEYS[4]) or '0')
  + tonumber(redis.call('GET', KEYS[5]) or '0')
local tripped = fails >= tonumber(ARGV[2]) and fails > tonumber(ARGV[5]) * oks
if tripped and redis.call('EXISTS', KEYS[2]) == 0 then
  local level = redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], 3600)
  local cool = math.min(tonumber(ARGV[3]) * 2 ^ (level - 1), tonumber(ARGV[4]))
  redis.call('SET', KEYS[2], '1', 'PX', math.floor(cool))
  redis.call('DEL', KEYS[1])
  return math.floor(cool)
end
return 0
"""


class Breaker:
    """One process's view of the shared breaker."""

    def __init__(self, r: redis.Redis):
        self.r = r
        self._failure = r.register_script(FAILURE_SCRIPT)
        # (A float swap is atomic under the GIL: the worker's threads share it without a lock.)
        # Until when this process may call without asking Redis (the breaker was closed).
        self._closed_until = 0.0

    def wait(self) -> float:
        """0 to go ahead and call, else how many seconds the caller should stay away."""
        if time.monotonic() < self._closed_until:
            return 0.0
        left = int(self.r.pttl(OPEN))
        if left <= 0:
            self._closed_until = time.monotonic() + CHECK_S
            return 0.0
        return left / 1000

    def failure(self) -> None:
        """Count a call the upstream failed (5xx, timeout, refused connection)."""
        second = now_us() // 1_000_000
        opened_ms = int(
            self._failure(
                keys=[FAILS, OPEN, LEVEL, _oks(second), _oks(second - 1)],
                args=[
                    FAIL_WINDOW_S,
                    THRESHOLD,
                    FIRST_COOL_OFF_S * 1000,
                    MAX_COOL_OFF_S * 1000,
                    RATIO,
                ],
            )
        )
        if opened_ms:
            self._closed_until = 0.0

    def success(self) -> None:
        """Count a successful call, closing the breaker (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        self.queue_success(pipe)
        pipe.execute()

    @staticmethod
    def queue_success(pipe: Any) -> None:
        """Count a successful call, closing the breaker; added to a pipeline the caller runs."""
        key = _oks(now_us() // 1_000_000)
        pipe.incr(key)
        pipe.expire(key, OK_WINDOW_S + 1)
        pipe.delete(OPEN, LEVEL)


def _oks(second: int) -> str:
    """The key counting one second's successes (the host's clock: hosts within a second of
    each other count into the same key)."""
    return f"{OKS}:{second}"
