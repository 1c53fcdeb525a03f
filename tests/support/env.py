"""What every test shares: where things are, this app's made-up credentials, waiting, and a
clean environment for the service processes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLIENT_ID = "2e9574ecd415c99346879d07689ec1c732c11036"
# Made up for the tests: not the guide's example secret, and greppable in every scan.
CLIENT_SECRET = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e70001"
FERNET_KEY = "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg="
FERNET_KEY_2 = "jS0G3ro4C3ulPP7rRLrPQHVa6lZIeJQ2sh8dtI1kIT4="
# Connect tickets' HS256 key for the tests (32 bytes or more, as the service demands).
TICKET_KEY = "ticket-key-for-tests-0123456789abcdef"


def wait_for(
    check: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `check` until it returns something truthy; fail the test past `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the check may fail while things start
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")


#: The per-source finish limits off.
NO_LIMITS = {"HUMANCONNECT_FINISH_LIMIT_PER_IP": "off", "HUMANCONNECT_FINISH_LIMIT_PER_USER": "off"}


def service_env(**overrides: str) -> dict[str, str]:
    """A clean environment for service processes: only what the test gives, plus PATH."""
    ours = ("HUMANAPI_", "HUMANCONNECT_", "REDIS_")  # REDIS_URL, REDIS_SENTINELS, ...
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.pop("DATABASE_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    # Tests send their bursts from one address; the limits' own tests turn them on.
    env.update(NO_LIMITS)
    env.update(overrides)
    return env


def deployment_env(redis_url: str, db_url: str, upstream_url: str, **extra: str) -> dict[str, str]:
    """`service_env` for a deployment against `upstream_url`: this app's credentials, and
    quick retries (a test waits seconds, not minutes); `extra` adds or overrides."""
    return service_env(
        **{
            "REDIS_URL": redis_url,
            "DATABASE_URL": db_url,
            "HUMANAPI_BASE_URL": upstream_url,
            "HUMANAPI_AUTH_URL": upstream_url,
            "HUMANAPI_CLIENT_ID": CLIENT_ID,
            "HUMANAPI_CLIENT_SECRET": CLIENT_SECRET,
            "HUMANCONNECT_ENCRYPTION_KEYS": FERNET_KEY,
            "HUMANAPI_MAX_RPS": "500",
            "HUMANCONNECT_RETRY_INITIAL_S": "0.05",
            "HUMANCONNECT_RETRY_INLINE_BUDGET_S": "1",
            "HUMANCONNECT_RETRY_MAX_COUNTDOWN_S": "2",
            **extra,
        }
    )


#: How many times a contract's timeout a test waits before calling it a hang: a bound that
#: guards against hanging, never one that measures speed on a machine others share.
HANG_GUARD = 10


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """`call()`'s result and the seconds it took: for lower bounds, hang guards and figures."""
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


async def wait_until(
    check: Callable[[], Any], timeout: float, interval: float = 0.01, what: str = ""
) -> Any:
    """`wait_for` inside an event loop: poll `check` without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not (last := check()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(interval)
    return last
