"""How late a `Running` stand-in may have stamped a call: its loop's worst lag while a test
watched. The stand-in serves from a thread of the test process, so a collection, the GIL
held by the test's own clients, or a busy machine holds its loop, and calls that arrived on
their slots are then stamped together when it runs again. A check of the upstream's pace
from those stamps allows for what the loop showed it lost, and nothing more."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from types import TracebackType

from humanconnect.sandbox.standin import Running

#: How often the probe asks its loop for the time: small against the lags that matter
#: (tens to hundreds of ms), a few hundred wakeups a second at most.
TICK_S = 0.005


class LoopLag:
    """While entered, the most the stand-in's loop ran a timer late (`worst`, seconds): a
    call that arrived while the loop was held was stamped up to that much late."""

    def __init__(self, running: Running):
        self._loop = running.loop
        self._stopped = False
        self._watching: Future[None] | None = None
        self._started = threading.Event()
        self.worst = 0.0

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        self._started.set()
        while not self._stopped:
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            self.worst = max(self.worst, loop.time() - due)

    def __enter__(self) -> LoopLag:
        self._watching = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)
        # Watching from here on: a hold that began before the probe ran would go unseen.
        if not self._started.wait(10):
            raise RuntimeError("the stand-in's loop never ran the lag probe")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stopped = True
        if self._watching is not None:
            self._watching.result(timeout=10)
