"""Workers killed (SIGKILL) or stopped (SIGTERM) mid-burst, then restarted."""

from __future__ import annotations

import signal

import pytest

from tests.support.chaos import SESSIONS, Chaos, bodies
from tests.support.env import wait_for

# Each scenario is a whole deployment and a burst of 1,000 sessions: the full suite only.
pytestmark = pytest.mark.slow


def _burst_then(chaos: Chaos, sig: int, *, after_stored: int) -> tuple[list[dict[str, str]], int]:
    """Accept a burst, let the workers get part-way, signal every worker, start new ones."""
    sent = bodies()
    sending = chaos.send_in_background(sent)
    wait_for(lambda: chaos.stored_count() >= after_stored, 120, interval=0.2, what="progress")
    chaos.signal_workers(sig)
    at_signal = chaos.stored_count()
    assert at_signal < SESSIONS, "the signal must land mid-burst"
    for _ in range(2):
        chaos.start_worker()
    assert {s.status for s in sending.result(120)} == {202}
    chaos.wait_ended({b["humanId"] for b in sent}, 240)
    return sent, at_signal


@pytest.mark.slow
@pytest.mark.parametrize(
    ("db_url", "batch"), [("sqlite", 1), ("postgresql", 1), ("sqlite", 8)], indirect=["db_url"]
)
def test_sigkill_of_every_worker_loses_nothing(chaos: Chaos, batch: int) -> None:
    """Kill -9 every worker process with sessions running and prefetched (with `batch` 8,
    batches half run and messages buffered for the next): after a restart each session ends
    once (redelivered by the broker, or re-sent by the reconciler)."""
    chaos.standin.state.faults.latency_ms = 100
    chaos.start(HUMANCONNECT_EXCHANGE_BATCH=str(batch))
    sent, at_signal = _burst_then(chaos, signal.SIGKILL, after_stored=200)
    # A token the upstream consumed whose answer died with the worker is the one documented
    # unpreventable loss: allowed, and counted.
    scenario = "sigkill-workers" + (f"-batch{batch}" if batch > 1 else "")
    tally = chaos.verify(scenario, len(sent), sent, may_lose_answers=True)
    assert (chaos.largest_batch() > 1) is (batch > 1)
    tally.extra["stored_when_signalled"] = at_signal
    tally.report()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_sigterm_restart_finishes_or_hands_back_every_task(chaos: Chaos) -> None:
    """A graceful stop finishes what is running and returns what is waiting: no task lost,
    none run twice, not even an unanswered call."""
    chaos.standin.state.faults.latency_ms = 100
    chaos.start()
    sent, at_signal = _burst_then(chaos, signal.SIGTERM, after_stored=200)
    tally = chaos.verify("sigterm-workers", len(sent), sent, may_lose_answers=False)
    tally.extra["stored_when_signalled"] = at_signal
    tally.report()
