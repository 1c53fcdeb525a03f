"""The one way to call the upstream: every call, from an exchange or a repair, passes the
shared circuit breaker and the global rate limit, renews whatever the caller holds, is timed,
and is retried inline by the same tenacity policy.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import redis
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_before_delay,
)

from humanconnect.errors import CircuitOpen, TransientUpstreamError
from humanconnect.settings import Settings
from humanconnect.upstream.breaker import Breaker
from humanconnect.upstream.retry import wait_honouring_retry_after

T = TypeVar("T")
#: Inline tries at most, whatever the budget allows.
INLINE_ATTEMPTS = 4
#: A wait for a rate-limit slot longer than this renews the caller's lock again before the
#: call: its term covers the call's timeouts plus 5 s (Settings.session_lock_s).
RENEW_AFTER_WAIT_S = 2.5


class AcquireSlot(Protocol):
    """Blocks until the caller may make one upstream call (GlobalRateLimiter.acquire)."""

    def __call__(
        self, *, priority: bool = False, on_grant: Callable[[float], object] | None = None
    ) -> float: ...


def free_slot(
    *, priority: bool = False, on_grant: Callable[[float], object] | None = None
) -> float:
    """An `AcquireSlot` whose slot is always free at once, for callers no shared limit
    governs: the tests not about the limit, the bench's exchange alone."""
    if on_grant is not None:
        on_grant(0.0)
    return 0.0


class UpstreamGuard:
    """Breaker, rate-limit slot and timings around upstream calls, for one process."""

    def __init__(self, r: redis.Redis, acquire_slot: AcquireSlot, settings: Settings):
        self.breaker = Breaker(r)
        self.acquire_slot = acquire_slot
        self.settings = settings

    def call(
        self,
        fn: Callable[[], T],
        *,
        timings: list[float],
        before: Callable[[], None] | None = None,
        count_success: bool = False,
        priority: bool = False,
    ) -> T:
        """One call of `fn`: refused with CircuitOpen while the breaker is open, else after a
        rate-limit slot (one of the first, with `priority`: a user is waiting), `before`
        (the caller's lock renewal, which may run twice) first. Its duration is appended to
        `timings`; a 5xx, timeout or refused connection counts against the breaker. A success
        is counted only with `count_success` (the exchange counts it in its own last round
        trip instead)."""
        stay_away = self.breaker.wait()
        if stay_away:
            # Jittered, so the queue doesn't come back all at once when it closes.
            raise CircuitOpen(
                "upstream failing: calls paused", retry_after=stay_away * (1 + random.random())
            )
        # The renewal first, and after a long wait again on the grant, where the limiter
        # counts it against the slot: between the slot and the call nothing but the call,
        # so calls reach the provider at the pace the slots were given.
        if before is not None:
            before()

        def renew_after_wait(waited: float) -> None:
            if before is not None and waited > RENEW_AFTER_WAIT_S:
                before()

        self.acquire_slot(priority=priority, on_grant=renew_after_wait)
        started = time.monotonic()
        try:
            result = fn()
        except TransientUpstreamError as exc:
            if exc.status is None or exc.status >= 500:
                self._count(self.breaker.failure)
            raise
        finally:
            timings.append(time.monotonic() - started)
        if count_success:
            self._count(self.breaker.success)
        return result

    def call_with_retries(
        self,
        fn: Callable[[], T],
        *,
        timings: list[float],
        before: Callable[[], None] | None = None,
        before_sleep: Callable[[RetryCallState], None] | None = None,
        count_success: bool = False,
        priority: bool = False,
    ) -> T:
        """`call`, retried inline for a transient error within the settings' inline budget;
        an open breaker or a longer outage raises, for the caller's slower retry to take."""
        s = self.settings
        retrying = Retrying(
            retry=retry_if_exception_type(TransientUpstreamError)
            & retry_if_not_exception_type(CircuitOpen),
            stop=stop_before_delay(s.retry_inline_budget_s) | stop_after_attempt(INLINE_ATTEMPTS),
            wait=wait_honouring_retry_after(s.retry_initial_s, s.retry_inline_budget_s),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(
            self.call,
            fn,
            timings=timings,
            before=before,
            count_success=count_success,
            priority=priority,
        )

    @staticmethod
    def _count(record: Callable[[], None]) -> None:
        try:
            record()
        except redis.exceptions.RedisError:
            pass  # the breaker is an optimisation: never let it fail a call
