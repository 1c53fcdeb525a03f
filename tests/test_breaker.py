"""The shared circuit breaker: opens on a run of upstream failures, holds calls off, closes on
the first success."""

from __future__ import annotations

from unittest import mock

import redis

from humanconnect.exchange import Exchanger
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.upstream import breaker
from humanconnect.upstream.breaker import Breaker
from tests import factories


def _fail(b: Breaker, n: int) -> None:
    for _ in range(n):
        b.failure()


def test_opens_after_a_run_of_failures_and_closes_on_a_success(
    redis_client: redis.Redis,
) -> None:
    b = Breaker(redis_client)
    _fail(b, breaker.THRESHOLD - 1)
    assert b.wait() == 0, "one short of the threshold: still closed"
    b.failure()
    assert 0 < Breaker(redis_client).wait() <= breaker.FIRST_COOL_OFF_S
    pipe = redis_client.pipeline()
    Breaker.queue_success(pipe)
    pipe.execute()
    assert Breaker(redis_client).wait() == 0


def test_a_few_failures_among_many_successes_never_open_it(redis_client: redis.Redis) -> None:
    pipe = redis_client.pipeline()
    for _ in range(100):
        Breaker.queue_success(pipe)
    pipe.execute()
    b = Breaker(redis_client)
    _fail(b, breaker.THRESHOLD + 5)
    assert b.wait() == 0


def test_cool_off_doubles_while_the_outage_lasts(redis_client: redis.Redis) -> None:
    b = Breaker(redis_client)
    _fail(b, breaker.THRESHOLD)
    first = redis_client.pttl(breaker.OPEN)
    redis_client.delete(breaker.OPEN)  # the cool-off ends; calls resume and fail again
    _fail(b, breaker.THRESHOLD)
    second = redis_client.pttl(breaker.OPEN)
    assert first <= breaker.FIRST_COOL_OFF_S * 1000 < second <= 2 * breaker.FIRST_COOL_OFF_S * 1000


def test_an_open_breaker_sends_the_run_back_without_calling(
    runtime: Runtime, standin: Running, redis_client: redis.Redis
) -> None:
    """While open: no upstream call, the session waits (jittered) and stays pending; once
    closed, the next delivery exchanges it and its success resets the breaker's level."""
    standin.state.faults = Faults(down=True)
    ex = Exchanger(runtime, factories.free_slot)
    # Up to four failing calls a run (fewer when the inline budget runs out first, as on a
    # busy machine): runs until the breaker has seen its threshold of failures.
    for _ in range(breaker.THRESHOLD):
        ex.run(factories.job())
        if sum(standin.state.calls.values()) >= breaker.THRESHOLD:
            break
    calls = sum(standin.state.calls.values())
    assert calls >= breaker.THRESHOLD
    job = factories.job()
    outcome = Exchanger(runtime, factories.free_slot).run(job)
    assert outcome.state == "retrying" and outcome.upstream_calls == 0
    assert outcome.retry_in is not None and outcome.retry_in > 0
    assert sum(standin.state.calls.values()) == calls, "called through an open breaker"
    standin.state.faults = Faults()
    redis_client.delete(breaker.OPEN)
    assert Exchanger(runtime, factories.free_slot).run(job, retries=1).state == "succeeded"
    assert redis_client.exists(breaker.LEVEL) == 0


def test_a_sudden_outage_after_busy_health_opens_it_within_a_window(
    redis_client: redis.Redis,
) -> None:
    """The successes of a busy healthy spell don't hold it closed through an outage for
    longer than one success-counting window. On the breaker's own clock, stepped by the
    test, so a busy machine can't stretch the seconds."""
    clock = [1_800_000_000 * 1_000_000]
    per_s = 100
    with mock.patch("humanconnect.upstream.breaker.now_us", lambda: clock[0]):
        # Given a busy healthy spell: 1,000 successes in the current window
        pipe = redis_client.pipeline()
        for _ in range(1000):
            Breaker.queue_success(pipe)
        pipe.execute()
        # When every call fails from now on, 100 a second
        b = Breaker(redis_client)
        failures = 0
        while Breaker(redis_client).wait() == 0 and failures < 15 * per_s:
            b.failure()
            failures += 1
            clock[0] += 1_000_000 // per_s
    # Then it opens within about 2 s (one window, and the second it began in), not after ten
    assert Breaker(redis_client).wait() > 0
    assert failures <= (breaker.OK_WINDOW_S + 1) * per_s, failures


def test_slow_failures_still_add_up(redis_client: redis.Redis) -> None:
    """Failures that come slowly (calls hanging to the read timeout) still open it: they are
    counted over a longer window than successes."""
    import time

    b = Breaker(redis_client)
    _fail(b, breaker.THRESHOLD // 2)
    time.sleep(breaker.OK_WINDOW_S + 0.5)
    _fail(b, breaker.THRESHOLD - breaker.THRESHOLD // 2)
    assert Breaker(redis_client).wait() > 0


def test_the_last_seconds_successes_still_count_when_a_new_second_begins(
    redis_client: redis.Redis,
) -> None:
    """A steady fault rate doesn't trip it when a new second begins: the first failure of
    that second still sees the successes of the one before (a fixed 2-second window once
    left it none, and a 30 % fault rate tripped the breaker at random). Two seconds without
    a success and it trips as before."""
    second = 1_800_000_000
    clock = [second * 1_000_000]
    with mock.patch("humanconnect.upstream.breaker.now_us", lambda: clock[0]):
        b = Breaker(redis_client)
        b.success()
        _fail(b, breaker.THRESHOLD - 1)
        clock[0] += 1_000_000  # the next second: none of its own successes yet
        b.failure()
        assert Breaker(redis_client).wait() == 0
        clock[0] += 1_000_000  # two seconds on, nothing succeeded: an outage
        b.failure()
        assert Breaker(redis_client).wait() > 0
