"""The upstream down for a minute, or hanging on some calls, mid-burst."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.support.chaos import SESSIONS, Chaos, bodies
from tests.support.env import wait_for
from tests.support.lag import LoopLag

# Each scenario is a whole deployment and a burst of 1,000 sessions: the full suite only.
pytestmark = pytest.mark.slow

OUTAGE_S = 60
READ_TIMEOUT_S = 5
MAX_RPS = 100


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_minute_of_503s_stores_everyone_without_a_herd(chaos: Chaos) -> None:
    """Only 503s for 60 s, then healthy: all stored, none failed. No herd: the calls never
    pass HUMANAPI_MAX_RPS in any second, and the shared breaker holds them to a fraction of
    what the limit alone would let through (one call per waiting session every few seconds)."""
    state = chaos.standin.state
    state.faults.latency_ms = 50
    chaos.start(HUMANAPI_MAX_RPS=str(MAX_RPS))
    sent = bodies()
    sending = chaos.send_in_background(sent)
    wait_for(lambda: chaos.stored_count() >= SESSIONS // 5, 120, interval=0.2, what="progress")
    # The stand-in stamps on its loop in this process: what held the loop is measured.
    with LoopLag(chaos.standin) as lag:
        state.faults.down = True
        down_at = time.monotonic()
        time.sleep(OUTAGE_S)
        stored_in_outage = chaos.stored_count()
        state.faults.down = False
        up_at = time.monotonic()
        assert stored_in_outage < SESSIONS, "the outage must land mid-burst"
        assert {s.status for s in sending.result(120)} == {202}
        chaos.wait_ended({b["humanId"] for b in sent}, 240)
    # Calls per second, from the stand-in's own clock (the same monotonic clock as ours).
    per_second = Counter(int(t - down_at) for t in state.call_times if t >= down_at)
    during = [per_second.get(s, 0) for s in range(OUTAGE_S)]
    after = [per_second.get(s, 0) for s in range(OUTAGE_S, OUTAGE_S + 10)]
    # The limiter's slots are spaced over 1/MAX_RPS; a little slack for the stand-in's stamps,
    # taken in this busy process, and as many calls as its loop's worst hold could have
    # stamped late into one second.
    slack = MAX_RPS * (1.1 + lag.worst)
    assert max(during) <= slack, (during, lag.worst)
    assert max(after) <= slack, (after, lag.worst)
    assert sum(during) > 0 and up_at - down_at >= OUTAGE_S
    assert sum(during) <= MAX_RPS * OUTAGE_S / 5, sum(during)
    tally = chaos.verify("upstream-503-60s", len(sent), sent, may_lose_answers=False)
    tally.extra.update(
        calls_during_outage=sum(during),
        peak_calls_per_s_during=max(during),
        mean_calls_per_s_during=round(sum(during) / OUTAGE_S, 1),
        peak_calls_per_s_after=max(after),
        limit_rps=MAX_RPS,
        stand_in_lag_ms=round(lag.worst * 1000),
        stored_during_outage=stored_in_outage,
    )
    tally.report()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_calls_hanging_past_the_read_timeout_strand_no_worker(chaos: Chaos) -> None:
    """5 % of calls hang for two minutes (before the token is used): each is cut at the 5 s
    read timeout and retried, so every session is stored long before a hung call would end.
    (A shorter timeout can cut a call that was only slow on a busy machine, after the
    stand-in used its token: that retry ends answer_lost, a different scenario.)"""
    state = chaos.standin.state
    state.faults.latency_ms = 20
    state.faults.phang = 0.05
    state.faults.hang_s = 120
    started = time.monotonic()
    chaos.start(HUMANAPI_READ_TIMEOUT_S=str(READ_TIMEOUT_S))
    sent = bodies()
    assert {s.status for s in chaos.send(sent)} == {202}
    # A thread stuck on a hung call would hold its session for 120 s: end well before that.
    chaos.wait_ended({b["humanId"] for b in sent}, 90)
    took = time.monotonic() - started
    hangs = state.calls["tokens:hang"]
    assert hangs >= 20, "the fault must have happened"
    tally = chaos.verify("upstream-hangs", len(sent), sent, may_lose_answers=False)
    tally.extra.update(
        hung_calls=hangs, hang_s=120, read_timeout_s=READ_TIMEOUT_S, ended_within_s=round(took)
    )
    tally.report()
