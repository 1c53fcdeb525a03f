"""The global outbound limit, shared through a real Redis by independent limiters."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from worker.ratelimit import GlobalRateLimiter, rate_item


def test_two_limiters_share_one_budget(redis_url: str, redis_client: redis.Redis) -> None:
    """Two 'processes' at 10/s together get no more than 10 slots in any one-second window."""
    # Given two limiters on the same Redis, like two worker processes
    limiters = [GlobalRateLimiter(redis_url, 10), GlobalRateLimiter(redis_url, 10)]
    stamps: list[float] = []
    lock = threading.Lock()

    def hammer(limiter: GlobalRateLimiter) -> None:
        for _ in range(15):
            limiter.acquire(timeout=10)
            with lock:
                stamps.append(time.monotonic())

    # When each tries to take 15 slots at once
    threads = [threading.Thread(target=hammer, args=(lim,)) for lim in limiters for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then all 60 got through, spread over at least five seconds (10/s, not 20/s) ...
    stamps.sort()
    assert len(stamps) == 60
    assert stamps[-1] - stamps[0] >= 4.9
    # ... and no window of 0.9 s held more than 10 (the margin absorbs thread wake-up jitter
    # between a slot being granted and its timestamp being taken here)
    worst = max(sum(1 for s in stamps[i:] if s - start < 0.9) for i, start in enumerate(stamps))
    assert worst <= 10


def test_acquire_times_out_instead_of_waiting_forever(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """With the window full, acquire gives up after its timeout."""
    limiter = GlobalRateLimiter(redis_url, 0.2)  # one call per five seconds
    limiter.acquire(timeout=1)
    with pytest.raises(TimeoutError):
        limiter.acquire(timeout=0.3)


@pytest.mark.parametrize(("rps", "amount", "seconds"), [(20, 20, 1), (0.5, 1, 2), (2.7, 2, 1)])
def test_rate_item_shapes(rps: float, amount: int, seconds: int) -> None:
    """Fractional limits become whole calls per whole seconds, never above the limit."""
    item = rate_item(rps)
    assert (item.amount, item.get_expiry()) == (amount, seconds)
