"""Retry policy shared by the exchange and the repair: pauses, and why a call is retried."""

from __future__ import annotations

import random
from collections.abc import Callable

from tenacity import RetryCallState, wait_random_exponential

from humanconnect.errors import CircuitOpen, UpstreamError


def backoff(retries: int, *, initial: float, cap: float, retry_after: float | None) -> float:
    """Exponential, jittered pause before Celery retry number `retries` (0-based)."""
    ceiling = min(cap, max(initial, 1.0) * 2.0**retries)
    pause = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:
        pause = max(pause, min(retry_after, cap))
    return pause


def wait_honouring_retry_after(initial: float, budget: float) -> Callable[[RetryCallState], float]:
    """Exponential jittered waits, or the upstream's Retry-After when it asks for longer."""
    base = wait_random_exponential(multiplier=max(initial, 0.001), max=max(initial, budget / 2))

    def wait(state: RetryCallState) -> float:
        pause = base(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, UpstreamError) and exc.retry_after is not None:
            pause = max(pause, exc.retry_after)
        return pause

    return wait


def retry_cause(exc: BaseException | None) -> str:
    """A fixed label for why a call is retried (never text from the upstream)."""
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    if isinstance(exc, UpstreamError) and exc.status is not None:
        return "429" if exc.status == 429 else ("5xx" if exc.status >= 500 else str(exc.status))
    if isinstance(exc, UpstreamError):
        return "timeout" if "timeout" in exc.reason else "connection"
    return "other"
