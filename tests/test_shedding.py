"""Load shedding: with HUMANCONNECT_MAX_BACKLOG sessions queued, a new finish gets 503 with
Retry-After and nothing of it is written; a duplicate of an accepted one is still answered;
everything queued is stored once the worker drains. A real web and worker on real Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from tests import factories
from tests.support.env import ROOT, wait_for
from tests.support.processes import Deployment, start_worker
from tests.support.scan import state_counts
from worker.redis_keys import PENDING, QUEUES

CAP = 10


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cap_is_queued_the_rest_shed_and_everything_queued_stored(
    deploy: Callable[..., Deployment], redis_client: redis.Redis, db_url: str, tmp_path: Path
) -> None:
    d = deploy(HUMANCONNECT_MAX_BACKLOG=str(CAP))
    # No worker while the queue fills: the cap is exact, not a race with the drain (a paused
    # worker would still take one message through the BRPOP it left waiting).
    d.worker.stop()
    try:
        bodies = [factories.finish_body() for _ in range(3 * CAP)]
        answers = [httpx.post(d.url + "/connect/finish", json=b, timeout=10) for b in bodies]
        codes = [a.status_code for a in answers]
        assert codes.count(202) == CAP and codes.count(503) == 2 * CAP, codes
        assert codes[:CAP] == [202] * CAP
        shed = [a for a in answers if a.status_code == 503]
        assert all(a.headers["Retry-After"] for a in shed)
        assert shed[0].json()["error"] == "too many sessions queued, try again"
        # Nothing of a shed finish was written: no claim, no status, no pending entry.
        assert sum(redis_client.llen(q) for q in QUEUES) == CAP
        assert redis_client.zcard(PENDING) == CAP
        assert len(list(redis_client.scan_iter("hc:session:*"))) == CAP
        assert len(list(redis_client.scan_iter("hc:request:*"))) == CAP
        # A duplicate of an accepted session is answered as before, full or not.
        again = httpx.post(d.url + "/connect/finish", json=bodies[0], timeout=10)
        assert again.status_code == 202
        assert again.json()["requestId"] == answers[0].json()["requestId"]
        # The process is fine: ready, and the metric says why finishes were refused.
        assert httpx.get(d.url + "/readyz").status_code == 200
        metrics = httpx.get(d.url + "/metrics").text
        assert 'humanconnect_finishes_total{outcome="refused",reason="backlog_full"} 20.0' in (
            metrics
        )
    finally:
        worker = start_worker(d.env, ROOT, tmp_path / "worker2.log")
    try:
        wait_for(lambda: state_counts(db_url).get("succeeded") == CAP, 60, what="the cap stored")
        # Drained: finishes are taken again.
        assert httpx.post(d.url + "/connect/finish", json=bodies[-1]).status_code == 202
    finally:
        worker.stop()
