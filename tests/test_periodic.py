"""The web's periodic loop (producer/periodic.py): rounds keep coming after one fails, a
repeated failure is logged once, the first round waits its delay, and stop ends the loop
whatever the round does with the cancel."""

from __future__ import annotations

import asyncio
import logging

import pytest

from producer.periodic import STOP_WITHIN_S, Periodic
from tests.support.env import HANG_GUARD, wait_until


class Rounds(Periodic):
    """Rounds that record when they ran and raise what `outcomes` says, in turn."""

    def __init__(
        self,
        interval_s: float,
        first_delay_s: float = 0.0,
        outcomes: tuple[type[Exception] | None, ...] = (),
    ):
        super().__init__(interval_s, first_delay_s=first_delay_s)
        self.times: list[float] = []
        self.outcomes = outcomes

    async def round(self) -> None:
        self.times.append(asyncio.get_running_loop().time())
        n = len(self.times) - 1
        if n < len(self.outcomes) and (failure := self.outcomes[n]) is not None:
            raise failure("a bug in a round")


def test_a_failed_round_is_logged_once_until_it_changes_and_the_rounds_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The memory watch runs four rounds a second: a failure that repeats must not flood
    the log, but a new one, or the old one back after a success, is logged again."""
    outcomes = (ValueError, ValueError, None, ValueError, KeyError, KeyError)

    async def run() -> int:
        rounds = Rounds(0.01, outcomes=outcomes)
        await rounds.start()
        # Past every outcome, into the successes after them.
        await wait_until(lambda: len(rounds.times) > len(outcomes) + 1, 30, what="rounds")
        await rounds.stop()
        return len(rounds.times)

    with caplog.at_level(logging.ERROR, logger="producer.periodic"):
        ran = asyncio.run(run())
    assert ran > len(outcomes)
    logged = [r.exc_info[0] for r in caplog.records if r.exc_info]
    assert logged == [ValueError, ValueError, KeyError]


def test_the_first_round_waits_its_delay_and_stop_ends_the_loop() -> None:
    """The connection keeper's first round is its start's own: the loop's waits a delay."""

    async def run() -> tuple[float, list[float], int, bool]:
        rounds = Rounds(0.05, first_delay_s=0.3)
        started = asyncio.get_running_loop().time()
        await rounds.start()
        await wait_until(lambda: len(rounds.times) >= 2, 30, what="two rounds")
        await rounds.stop()
        # Ended, not merely between rounds: no round can come after the stop.
        ended = rounds._task is not None and rounds._task.done()
        return started, rounds.times, len(rounds.times), ended

    started, times, ran, ended = asyncio.run(run())
    # The delay is a lower bound: the first round never comes early.
    assert times[0] - started >= 0.3
    assert ran >= 2 and ended


class Swallowing(Periodic):
    """A round that takes its cancel for an error and carries on (as redis-py may turn a
    cancel that lands inside its connect into a RedisError)."""

    def __init__(self) -> None:
        super().__init__(0.5)
        self.rounds = 0

    async def round(self) -> None:
        self.rounds += 1
        try:
            # Far longer than any wait below: a stop that waited the round out would hang.
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass


def test_stop_is_bounded_when_a_round_swallows_its_cancel() -> None:
    """The web's shutdown once hung on such a round: the stop waits a bounded time and the
    loop ends on its flag, running no further round."""

    async def run() -> tuple[bool, int]:
        loop = Swallowing()
        await loop.start()
        await wait_until(lambda: loop.rounds == 1, 30, what="inside its first round")
        # A stop that waited the round out would take an hour: this only tells a hang.
        await asyncio.wait_for(loop.stop(), HANG_GUARD * STOP_WITHIN_S)
        # Past the loop's sleep it ends on its flag instead of running another round.
        assert loop._task is not None
        await asyncio.wait({loop._task}, timeout=HANG_GUARD * loop.interval_s)
        return loop._task.done(), loop.rounds

    ended, rounds = asyncio.run(run())
    assert ended
    assert rounds == 1
