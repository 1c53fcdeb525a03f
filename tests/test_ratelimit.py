"""The global outbound limit, shared through a real Redis by independent limiters."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from humanconnect.sandbox.standin import Running
from humanconnect.upstream.limiter import LATE_S, GlobalRateLimiter, slot_interval
from tests.support import figures
from tests.support.lag import LoopLag
from tests.support.servers import RedisServer


def _script_calls(r: redis.Redis) -> int:
    """Scripts the Redis server has run so far (every command the limiter sends is one)."""
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def test_two_limiters_share_one_budget(redis_url: str, redis_client: redis.Redis) -> None:
    """Two 'processes' at 10/s together get no more than 10 slots in any one-second window."""
    # Given two limiters on the same Redis, like two worker processes
    limiters = [
        GlobalRateLimiter(redis.Redis.from_url(redis_url), 10),
        GlobalRateLimiter(redis.Redis.from_url(redis_url), 10),
    ]
    stamps: list[float] = []
    lock = threading.Lock()

    def hammer(limiter: GlobalRateLimiter) -> None:
        for _ in range(15):
            # When the slot was taken, as acquire measured it at its lateness check: a
            # stamp taken after it returns could trail it by however long this thread then
            # waited for the CPU.
            started = time.monotonic()
            waited = limiter.acquire(timeout=10)
            with lock:
                stamps.append(started + waited)

    # When each tries to take 15 slots at once
    threads = [threading.Thread(target=hammer, args=(lim,)) for lim in limiters for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then all 60 got through, spread over at least 59 intervals (10/s, not 20/s) ...
    stamps.sort()
    assert len(stamps) == 60
    assert stamps[-1] - stamps[0] >= 59 * slot_interval(10) - 0.05
    # ... and no one-second window held more than 10
    assert figures.most_in_window(stamps, 1.0) <= 10


def test_waiting_threads_cost_a_call_per_slot_not_a_poll_each(own_redis: RedisServer) -> None:
    """Thirty-two threads waiting on a 20/s limit make about one Redis call per slot between
    them: no thread polls."""
    # A server of its own: its command counts are server-wide, and nothing else may add to them.
    redis_client = redis.Redis.from_url(own_redis.url)
    limiter = GlobalRateLimiter(redis.Redis.from_url(own_redis.url), 20)
    limiter.acquire()  # the script is loaded: from here on, one EVALSHA per reservation
    before = _script_calls(redis_client)
    threads = [threading.Thread(target=limiter.acquire, kwargs={"timeout": 10}) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls = _script_calls(redis_client) - before
    # 32 slots at 20/s take 1.6 s; reserving up to 0.1 s ahead grants two or three a call.
    assert calls <= 32
    assert calls >= 32 / 3


def test_a_priority_caller_takes_the_next_slot(redis_url: str, redis_client: redis.Redis) -> None:
    """With twenty threads queued on a 5/s limit, a priority caller arriving last is served
    next, not after those still waiting."""
    limiter = GlobalRateLimiter(redis.Redis.from_url(redis_url), 5)
    order: list[str] = []
    lock = threading.Lock()

    def take(name: str, priority: bool) -> None:
        limiter.acquire(timeout=10, priority=priority)
        with lock:
            order.append(name)

    queued = [threading.Thread(target=take, args=(f"q{i}", False)) for i in range(20)]
    for t in queued:
        t.start()
    time.sleep(0.5)  # two or three slots handed out; the rest wait in line
    with lock:
        served_already = len(order)
    urgent = threading.Thread(target=take, args=("urgent", True))
    urgent.start()
    for t in [*queued, urgent]:
        t.join()
    # Next, or one later: a slot may already be in a thread's hand, or its name not yet
    # written down, when the urgent caller arrives.
    served_before = order.index("urgent")
    # Enough still waiting that being served next is not being served last.
    assert served_already <= 15, order
    assert served_before <= served_already + 2, order
    assert len(order) == 21


def test_acquire_times_out_instead_of_waiting_forever(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """With the next slot far off, acquire gives up after its timeout."""
    limiter = GlobalRateLimiter(redis.Redis.from_url(redis_url), 0.2)  # one call per five seconds
    limiter.acquire(timeout=1)
    with pytest.raises(TimeoutError):
        limiter.acquire(timeout=0.3)


def test_redis_gone_reaches_the_caller(redis_client: redis.Redis) -> None:
    """A limiter whose Redis is unreachable raises Redis's error to the waiting caller (its
    task's infrastructure retry takes it), rather than hanging."""
    limiter = GlobalRateLimiter(redis.Redis.from_url("redis://127.0.0.1:1/0"), 20)
    with pytest.raises(redis.exceptions.ConnectionError):
        limiter.acquire(timeout=5)


def test_what_the_caller_does_on_the_grant_counts_against_its_slot(redis_url: str) -> None:
    """A grant whose caller then runs late (a lock renewal held up) is not used: the caller
    waits for the next slot, so its call still leaves on its slot's time."""
    limiter = GlobalRateLimiter(redis.Redis.from_url(redis_url), 10)
    grants: list[float] = []

    def slow_first(waited: float) -> None:
        grants.append(waited)
        if len(grants) == 1:
            time.sleep(LATE_S * 2)

    waited = limiter.acquire(timeout=10, on_grant=slow_first)
    assert len(grants) == 2
    # The second slot came at least one interval after the first.
    assert waited >= 0.9 * limiter.interval


def test_the_pace_checks_see_how_long_the_stand_ins_loop_was_held(standin: Running) -> None:
    """The end-to-end pace checks allow for stamps made late by a held stand-in loop
    (tests/support/lag.py): a loop held 300 ms is seen as held at least about that long."""
    with LoopLag(standin) as held:
        time.sleep(0.05)
        standin.loop.call_soon_threadsafe(time.sleep, 0.3)
        time.sleep(0.5)
    # The probe's timer was due at most one tick after the hold began.
    assert held.worst >= 0.3 - 0.01, held.worst
