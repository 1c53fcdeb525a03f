"""One clock for newest-wins: the receive time that decides whose tokens are kept is Redis's,
read inside the accept call, not the clock of whichever web host took the finish. A second
web runs 5 s ahead (libfaketime); a user's earlier session goes through it, the later one
through the right-clocked web, and the later one's tokens are kept."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest
import redis

from humanconnect import redis_keys
from humanconnect.sandbox.standin import Running
from tests import factories
from tests.support.env import CI, ROOT, wait_for
from tests.support.processes import Deployment, start_web
from tests.support.scan import stored_users

# CI installs libfaketime (.ci/run); a developer's machine without it skips.
pytestmark = pytest.mark.skipif(
    not shutil.which("faketime") and not CI, reason="needs faketime (apt-get install faketime)"
)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_web_whose_clock_runs_ahead_cannot_make_an_older_session_win(
    deploy: Callable[..., Deployment],
    standin: Running,
    redis_client: redis.Redis,
    db_url: str,
    tmp_path: Path,
) -> None:
    d = deploy()
    ahead, ahead_url = start_web(
        d.env, ROOT, tmp_path / "ahead.log", prefix=("faketime", "-f", "+5s")
    )
    try:
        # The web really runs ahead: its Date header is 5 s past the other's.
        ahead_date, date = (
            parsedate_to_datetime(httpx.get(u + "/healthz").headers["date"])
            for u in (ahead_url, d.url)
        )
        assert (ahead_date - date).total_seconds() >= 4
        users = [factories.human_id() for _ in range(10)]
        first = {h: factories.finish_body(humanId=h) for h in users}
        later = {h: factories.finish_body(humanId=h) for h in users}
        sent = [httpx.post(ahead_url + "/connect/finish", json=first[h]) for h in users]
        time.sleep(0.05)
        answers = {h: httpx.post(d.url + "/connect/finish", json=later[h]) for h in users}
        sent += answers.values()
        assert {a.status_code for a in sent} == {202}
        # Each record's receive time is Redis's (this machine's clock, not 5 s ahead).
        for a in sent:
            record = redis_client.hgetall(redis_keys.request_status(a.json()["requestId"]))
            assert abs(int(record[b"receivedUs"]) / 1e6 - time.time()) < 3

        def ended() -> bool:
            states = [
                redis_client.hget(redis_keys.request_status(a.json()["requestId"]), "state")
                for a in sent
            ]
            return all(s == b"succeeded" for s in states)

        wait_for(ended, 30, what="both sessions of every user exchanged")
        stored = stored_users(db_url)
        issued = standin.state.by_session
        for h in users:
            assert stored[h].access_token == issued[later[h]["sessionToken"]].access_token, h
    finally:
        ahead.stop()
