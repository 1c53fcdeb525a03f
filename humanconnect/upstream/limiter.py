"""One outbound limit to the upstream, shared by every worker process through Redis.

A Celery `rate_limit` is per worker; this one is global, so adding workers never multiplies
the load on the provider. It schedules instead of polling:

- Redis keeps one number, the time of the next free slot (GCRA's "theoretical arrival
  time"). One script call reserves the next slots, spaced evenly, and says how far ahead the
  first one is, by Redis's own clock, so hosts whose clocks disagree still share one pace.
- In each process one dispatcher thread makes those calls, only while some thread waits,
  and reserves no further ahead than `HORIZON_S`: many waiting threads cost one Redis call
  per few slots, not a loop of calls each.
- It sleeps until each slot and hands it to the thread that should have it: a waiting user's
  finish (`priority=True`) before anything else, then first come first served. A slot is
  given at its time, not at its reservation, so a waiting user who arrives late still takes
  the process's next slot.

Slots are spaced `PACING` times the plain interval apart, and a slot is used within `LATE_S`
of its time or not at all: a dispatcher that woke late lets the slots it overslept lapse, and
a thread that got its slot but ran late (counting what its caller does on the grant, such
as renewing a lock) goes back to the head of the line. Calls in any one-second window then
leave with slots from a span of at most 1 + LATE_S seconds, and reach the upstream within
the rest of the slack: max_rps slots span PACING seconds, so what is left, PACING − 1 −
LATE_S seconds (25 ms), is for the send itself. A process starved of CPU for a moment (a GC
pause, a busy neighbour) slows down instead of sending its overdue calls at once. With a
narrower spacing, and the lock renewed between slot and send, niced workers on busy CPUs
put more than max_rps calls in one second at the stand-in (tests/test_limit_processes.py).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from humanconnect.redis_keys import UPSTREAM_LIMIT as KEY

#: How far ahead one process reserves slots for its waiting threads.
HORIZON_S = 0.1
#: Spacing above the plain 1/max_rps: 5 % of throughput for a window that is never exceeded.
PACING = 1.05
#: How late a slot may still be used (below PACING − 1 seconds; see above).
LATE_S = 0.025

# KEYS[1]: the next free slot (µs, Redis's clock). ARGV: slot interval µs, slots wanted,
# horizon µs. Returns {µs from now to the first slot granted, slots granted}: the first at
# max(now, next free), the rest `interval` apart, as many as wanted within the horizon (at
# least one).
RESERVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local first = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
local fit = math.floor((now + tonumber(ARGV[3]) - first) / interval) + 1
local n = math.max(1, math.min(tonumber(ARGV[2]), fit))
local after = first + n * interval
local ttl_ms = math.ceil((after - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', ttl_ms)
return {string.format('%.0f', first - now), n}
"""


def slot_interval(max_rps: float) -> float:
    """Seconds between two upstream calls at `max_rps`, paced."""
    return PACING / max_rps


@dataclass(order=True)
class _Waiter:
    rank: tuple[int, int]
    granted: threading.Event = field(default_factory=threading.Event, compare=False)
    #: The slot's time (monotonic), set when granted.
    slot: float = field(default=0.0, compare=False)
    error: BaseException | None = field(default=None, compare=False)
    abandoned: bool = field(default=False, compare=False)


class GlobalRateLimiter:
    """Block the calling thread until it holds one slot of the shared upstream pace."""

    def __init__(self, client: redis.Redis, max_rps: float):
        self._redis = client
        self._reserve = self._redis.register_script(RESERVE_SCRIPT)
        self.interval = slot_interval(max_rps)
        self._cond = threading.Condition()
        self._waiters: list[_Waiter] = []
        self._order = itertools.count()
        self._dispatcher: threading.Thread | None = None

    def acquire(
        self,
        timeout: float = 60.0,
        *,
        priority: bool = False,
        on_grant: Callable[[float], object] | None = None,
    ) -> float:
        """Take one slot; return the seconds spent waiting. A `priority` caller is served
        before every other waiting one in this process. `on_grant` (given the seconds waited
        so far) runs once a slot is given and counts against it: if it ran the slot late,
        the caller waits for another. Raises TimeoutError past `timeout`, and the Redis
        error that kept the dispatcher from reserving."""
        started = time.monotonic()
        rank = (0 if priority else 1, next(self._order))
        while True:
            waiter = _Waiter(rank)
            with self._cond:
                heapq.heappush(self._waiters, waiter)
                self._ensure_dispatcher()
                self._cond.notify_all()
            remaining = timeout - (time.monotonic() - started)
            if not waiter.granted.wait(max(remaining, 0)):
                with self._cond:
                    if not waiter.granted.is_set():
                        waiter.abandoned = True
                        raise TimeoutError("upstream rate limit: no slot in time")
            if waiter.error is not None:
                raise waiter.error
            if on_grant is not None:
                on_grant(time.monotonic() - started)
            if time.monotonic() - waiter.slot <= LATE_S:
                return time.monotonic() - started
            # This thread ran too late to use its slot: back to its place in line.

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or not self._dispatcher.is_alive():
            self._dispatcher = threading.Thread(
                target=self._dispatch, name="upstream-slots", daemon=True
            )
            self._dispatcher.start()

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._live_waiters():
                    self._cond.wait()
                # Only callers still waiting: one that timed out must not reserve a slot
                # that every other process then can't use.
                wanted = sum(1 for w in self._waiters if not w.abandoned)
            # Slots are placed from when the call left, not when its answer came back: an
            # answer held up in this process then makes its slots late (and lapse), never
            # closer to the next reservation's.
            sent = time.monotonic()
            try:
                ahead_us, granted = self._reserve(
                    keys=[KEY],
                    args=[max(1, round(self.interval * 1e6)), wanted, round(HORIZON_S * 1e6)],
                )
            except redis.exceptions.RedisError as exc:
                self._fail_all(exc)
                continue
            first = sent + int(ahead_us) / 1e6
            for i in range(int(granted)):
                slot = first + i * self.interval
                pause = slot - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                elif -pause > LATE_S:
                    continue  # overslept: this slot lapses rather than go out with the next
                if not self._hand_out(slot):
                    break  # nobody left to take the rest: they lapse unused

    def _live_waiters(self) -> bool:
        while self._waiters and self._waiters[0].abandoned:
            heapq.heappop(self._waiters)
        return bool(self._waiters)

    def _hand_out(self, slot: float) -> bool:
        """Give the slot that is due now to the first waiter in line; False when none."""
        with self._cond:
            if not self._live_waiters():
                return False
            waiter = heapq.heappop(self._waiters)
            waiter.slot = slot
            waiter.granted.set()
            return True

    def _fail_all(self, exc: BaseException) -> None:
        # Each waiting caller gets the error, as it would have calling Redis itself, and
        # takes it to its own retry path; the next caller starts a fresh reservation.
        with self._cond:
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.error = exc
            waiter.granted.set()
