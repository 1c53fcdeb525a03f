"""Redis SIGKILLed mid-burst and restarted from its append-only file."""

from __future__ import annotations

import time

import pytest

from humanconnect.redis_keys import request_status
from tests.support.chaos import Chaos, bodies
from tests.support.env import wait_for

# Each scenario is a whole deployment and a burst of 1,000 sessions: the full suite only.
pytestmark = pytest.mark.slow


def taken(chaos: Chaos) -> int:
    """Finishes the web has taken so far: their status records in Redis."""
    return sum(1 for _ in chaos.r.scan_iter(request_status("*"), count=1000))


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("batch", [1, 8])
def test_redis_killed_mid_burst_keeps_every_accepted_session(chaos: Chaos, batch: int) -> None:
    """Every 202 ends stored; a finish during the outage gets a quick 503, never a hang
    (with `batch` 8, the workers run their sessions eight at a time)."""
    chaos.standin.state.faults.latency_ms = 50
    chaos.start(HUMANCONNECT_EXCHANGE_BATCH=str(batch))
    sent = bodies()
    # Paced at 100/s so that finishes arrive before, during and after the outage.
    sending = chaos.send_in_background(sent, rate=100)
    # Killed once the web has taken a hundred of the burst's finishes (each has its status
    # record): the workers may lag far behind on a busy machine, the accepts do not.
    wait_for(
        lambda: taken(chaos) >= len(chaos.warm) + 100, 60, interval=0.1, what="burst under way"
    )
    chaos.redis.kill()
    # The outage's length is the scenario: finishes keep arriving while Redis is away.
    time.sleep(3)
    chaos.redis.start()
    results = sending.result(120)
    statuses = {s.status for s in results}
    refused = [s for s in results if s.status == 503]
    accepted = [s.body for s in results if s.status == 202]
    assert statuses == {202, 503}, statuses
    # Refused at once (the API promises within 2 s), with a hint: never held for the outage.
    slowest_503 = max(s.seconds for s in refused)
    assert slowest_503 < 2, sorted(round(s.seconds, 2) for s in refused)[-10:]
    assert max(s.seconds for s in results) < 10, "a finish was held open"
    assert all(s.retry_after for s in refused)
    # The client sends the refused ones again; Redis is back, so they are taken now.
    chaos.send_until_accepted([s.body for s in refused])
    chaos.wait_ended({b["humanId"] for b in sent}, 240)
    # Nothing between the upstream's answer and the store needs Redis: no answer is lost.
    tally = chaos.verify(
        "redis-sigkill" + (f"-batch{batch}" if batch > 1 else ""),
        len(sent),
        sent,
        may_lose_answers=False,
    )
    assert (chaos.largest_batch() > 1) is (batch > 1)
    tally.extra.update(
        accepted_first_time=len(accepted),
        refused_503_during_outage=len(refused),
        slowest_503_s=round(slowest_503, 3),
        slowest_answer_s=round(max(s.seconds for s in results), 3),
    )
    tally.report()
