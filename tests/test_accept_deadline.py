"""The web's deadline on the accept call holds even when the call is slow to let go: a finish
whose Redis does not answer gets its 503 at the deadline, not when a cancelled redis-py call
has finished tearing down its connection (as against a frozen primary)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from humanconnect.crypto import Cipher
from humanconnect.queue import sender
from humanconnect.settings import Settings
from producer.accept import ACCEPT_DEADLINE_S, Acceptor
from producer.body import FinishBody
from producer.claims import Claim
from producer.errors import QueueUnavailableError
from producer.message import MessageBuilder
from tests import factories
from tests.support.env import FERNET_KEY

# How long a cancelled call holds on; far past the deadline, so waiting for it shows.
LET_GO_S = 30.0


class _StuckRedis:
    """Claims on a Redis that never answers `stuck_on` ("accept" or "state") and whose
    cancelled call takes LET_GO_S to let go."""

    replica_wait_s = 0.0

    def __init__(self, stuck_on: str):
        self.stuck_on = stuck_on
        self.cancelled = asyncio.Event()

    async def _hang(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            await asyncio.sleep(LET_GO_S)
            raise

    async def accept(self, *args: Any, **kwargs: Any) -> Claim:
        if self.stuck_on == "accept":
            await self._hang()
        # A duplicate: an earlier request holds the session, for the same humanId
        return Claim(request_id="r-earlier", same_human=True, mine=False)

    async def state(self, request_id: str) -> dict[str, str] | None:
        await self._hang()
        return None


@pytest.mark.parametrize("stuck_on", ["accept", "state"])
def test_a_call_slow_to_let_go_does_not_hold_the_503(stuck_on: str) -> None:
    async def run() -> tuple[float, bool]:
        claims = _StuckRedis(stuck_on)
        app = sender(Settings.model_validate({"REDIS_URL": "redis://127.0.0.1:1/0"}), "t")
        acceptor = Acceptor(claims, MessageBuilder(app), Cipher([FERNET_KEY]))  # type: ignore[arg-type]
        body = FinishBody(**factories.finish_body())
        start = time.monotonic()
        with pytest.raises(QueueUnavailableError):
            await acceptor.accept(body)
        took = time.monotonic() - start
        await asyncio.sleep(0)  # let the cancellation reach the call
        return took, claims.cancelled.is_set()

    took, cancelled = asyncio.run(run())
    # Then the 503 came from the deadline, long before the call let go, and the call was
    # cancelled, not left running
    assert took >= ACCEPT_DEADLINE_S * 0.9
    assert took < LET_GO_S / 2, f"waited {took:.1f} s for the cancelled call"
    assert cancelled
