"""`Prefer: wait=N`: wake waiting requests when their exchange finishes.

One pattern subscription per web process (not one connection per waiting request), fed by
the worker's `PUBLISH hc:done:{requestId}`; each waiting request holds a future, not a thread,
and never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from humanconnect.redis_keys import DONE_PATTERN as PATTERN

log = logging.getLogger(__name__)

# RFC 7240: `Prefer: wait=5`, possibly among other preferences.
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?([^\s,;\"]*)\"?", re.IGNORECASE)
MAX_WAIT_S = 30.0
#: What a `wait` that asks for too much, or can't be read, gets instead of an error.
DEFAULT_WAIT_S = 10.0


def parse_prefer_wait(header: str | None) -> float | None:
    """Seconds to wait from a Prefer header: None without `wait`, the default when bad."""
    if not header:
        return None
    match = _WAIT.search(header)
    if match is None:
        return None
    try:
        seconds = float(match.group(1))
    except ValueError:
        return DEFAULT_WAIT_S
    if not 0 <= seconds <= MAX_WAIT_S or seconds != seconds:  # NaN is not a wait
        return DEFAULT_WAIT_S
    return seconds


def requested_wait(prefer: str | None, query_wait: str | None) -> float | None:
    """The wait a finish asks for: `Prefer: wait=N`, else `?wait=N` on the URL (the provider's
    mobile SDKs post to a fixed authURL and can't add a header); the same rules for both."""
    from_header = parse_prefer_wait(prefer)
    if from_header is not None or query_wait is None:
        return from_header
    return parse_prefer_wait(f"wait={query_wait}")


class Waiters:
    """Futures keyed by requestId, resolved by one background subscriber."""

    def __init__(self, r: Redis):
        self.r = r
        self._waiting: dict[str, list[asyncio.Future[str]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="prefer-wait-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: a shutdown must not hang on a Redis that stopped answering.
            await asyncio.wait({self._task}, timeout=2)

    async def _listen(self) -> None:
        while True:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(PATTERN)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "pmessage":
                        channel, state = str(message["channel"]), str(message["data"])
                        self._wake(channel.rsplit(":", 1)[1], state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: waiters time out, we retry
                log.warning("wait listener reconnecting: %s", type(exc).__name__)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)

    def _wake(self, request_id: str, state: str) -> None:
        for future in self._waiting.pop(request_id, []):
            if not future.done():
                future.set_result(state)

    @contextlib.asynccontextmanager
    async def waiting(self, request_id: str) -> AsyncIterator[asyncio.Future[str]]:
        """Register interest first, so a finish between the check and the wait isn't missed."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(request_id, []).append(future)
        try:
            yield future
        finally:
            futures = self._waiting.get(request_id)
            if futures and future in futures:
                futures.remove(future)
                if not futures:
                    del self._waiting[request_id]
