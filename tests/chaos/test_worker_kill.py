"""Chaos: the worker is SIGKILLed mid-burst and restarted; nothing accepted is lost."""

from __future__ import annotations

import signal

import pytest

from humanconnect.procs import commands
from humanconnect.standin import Faults, Running
from tests import factories
from tests.conftest import Deployment
from tests.support import ROOT, Process, start_worker, wait_for
from tests.test_e2e import burst, states, stored_users
from worker.reconcile import STALE_S


@pytest.mark.slow
def test_sigkilled_worker_loses_nothing_and_exchanges_nothing_twice(
    deploy, standin: Running
) -> None:
    """Kill -9 the worker with sessions in flight: after a restart every one ends, once."""
    # Given 300 sessions accepted against a slow upstream, beat running, a worker part-way
    standin.state.faults = Faults(latency_ms=100)
    d: Deployment = deploy()
    beat = Process(
        "beat",
        commands(0, d.worker.log_path.parent)["beat"],
        d.env,
        ROOT,
        d.worker.log_path.with_name("beat.log"),
    )
    bodies = [factories.finish_body() for _ in range(300)]
    assert {r.status_code for r in burst(d.url, bodies)} == {202}
    wait_for(lambda: (states(d.db_url).get("succeeded") or 0) >= 50, 60, what="some progress")
    # When the worker is killed outright, holding prefetched and running sessions
    d.worker.signal(signal.SIGKILL)
    d.worker.proc.wait(10)
    assert states(d.db_url).get("succeeded", 0) < 300, "the kill must land mid-burst"
    # Then a new worker ends every one: redelivered by the broker's visibility timeout, or
    # re-sent by the reconciler when the broker lost it between BRPOP and its unacked record
    worker = start_worker(d.env, ROOT, d.worker.log_path.with_name("worker2.log"), concurrency=32)
    try:
        wait_for(
            lambda: (
                sum(states(d.db_url).values()) == 300
                and set(states(d.db_url)) <= {"succeeded", "failed"}
            ),
            STALE_S + 120,
            interval=1,
            what="all 300 ended after the restart",
        )
    finally:
        worker.stop()
        beat.stop()
    final = states(d.db_url)
    # The only failures allowed are the contract's one unpreventable loss: a token the
    # upstream consumed whose answer died with the killed worker.
    assert stored_users(d.db_url).keys() == {b["humanId"] for b in bodies} - _lost(d)
    assert final["succeeded"] + len(_lost(d)) == 300
    assert max(standin.state.exchanges.values()) == 1, "a session was exchanged twice"


def _lost(d: Deployment) -> set[str]:
    from sqlalchemy import text

    from worker.db import session_factory

    with session_factory(d.db_url)() as db:
        rows = db.execute(text("SELECT human_id, error_kind FROM sessions WHERE state = 'failed'"))
        found = {(h, k) for h, k in rows}
    assert {k for _, k in found} <= {"answer_lost"}, found
    return {h for h, _ in found}
