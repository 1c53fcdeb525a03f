"""A round of work the web repeats on its event loop until it stops (the Redis memory watch,
the connection keeper)."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

#: The longest `stop` waits for a round in progress.
STOP_WITHIN_S = 2.0


class Periodic:
    """Runs `round` every `interval_s`, the first after `first_delay_s`, until `stop`. A round
    that raises is logged and the next one runs: a loop that died would leave the web acting
    on a stale reading or a cold pool for good. A failure that repeats is logged once (with
    its traceback) until a round succeeds or another failure comes: the memory watch runs
    four rounds a second."""

    def __init__(self, interval_s: float, *, first_delay_s: float = 0.0):
        self.interval_s = interval_s
        self.first_delay_s = first_delay_s
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._failing: type[BaseException] | None = None

    async def round(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(self.first_delay_s)
        while not self._stopped:
            try:
                await self.round()
                self._failing = None
            except Exception as exc:
                if type(exc) is not self._failing:
                    log.exception("%s: round failed, trying again later", type(self).__name__)
                self._failing = type(exc)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        self._stopped = True
        if self._task:
            self._task.cancel()
            # Not `await self._task`: a cancel that lands while redis-py opens a connection
            # comes back as a RedisError, which a round takes for Redis being away (seen: the
            # web's shutdown hung). The flag ends the loop after its sleep regardless, and
            # the wait is bounded meanwhile.
            await asyncio.wait({self._task}, timeout=min(2 * self.interval_s + 1, STOP_WITHIN_S))
