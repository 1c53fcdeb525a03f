"""The web's periodic loop (producer/periodic.py): rounds keep coming after one fails, the
first waits its delay, and stop ends it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from producer.periodic import Periodic


class Rounds(Periodic):
    def __init__(self, interval_s: float, first_delay_s: float = 0.0, fail_first: int = 0):
        super().__init__(interval_s, first_delay_s=first_delay_s)
        self.times: list[float] = []
        self.fail_first = fail_first

    async def round(self) -> None:
        self.times.append(asyncio.get_running_loop().time())
        if len(self.times) <= self.fail_first:
            raise ValueError("a bug in a round")


def test_a_round_that_raises_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> int:
        rounds = Rounds(0.01, fail_first=2)
        await rounds.start()
        await asyncio.sleep(0.2)
        await rounds.stop()
        return len(rounds.times)

    with caplog.at_level(logging.ERROR, logger="producer.periodic"):
        ran = asyncio.run(run())
    assert ran > 3
    assert [r.getMessage() for r in caplog.records] == [
        "Rounds: round failed, trying again later"
    ] * 2


def test_the_first_round_waits_its_delay_and_stop_ends_the_loop() -> None:
    async def run() -> tuple[float, list[float], int]:
        rounds = Rounds(0.05, first_delay_s=0.3)
        started = asyncio.get_running_loop().time()
        await rounds.start()
        await asyncio.sleep(0.5)
        await rounds.stop()
        after_stop = len(rounds.times)
        await asyncio.sleep(0.2)
        assert len(rounds.times) == after_stop
        return started, rounds.times, after_stop

    started, times, ran = asyncio.run(run())
    assert times[0] - started >= 0.3
    assert ran >= 2
