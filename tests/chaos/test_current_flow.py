"""The current flow's finishes (the close payload: the worker fetches an access token) under
the chaos suite's two crashes: every worker SIGKILLed mid-burst, and Redis SIGKILLed
mid-burst and restarted from its append-only file. No finish answered `202` is lost; no
user's access token is fetched twice for one finish, but where a killed worker took the
provider's answer with it (the fetch is then simply made again: an access token, unlike a
session token, can be asked for again)."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import text

from humanconnect.states import RequestState
from humanconnect.storage.db import session_factory
from tests import factories
from tests.support.chaos import THREADS, Chaos, Tally
from tests.support.env import CLIENT_SECRET, TICKET_KEY, wait_for
from tests.support.scan import assert_no_secrets, stored_users, stream_entries

pytestmark = pytest.mark.slow

USERS = 300
SOURCE = "Chaos Clinic"


def _users(chaos: Chaos) -> tuple[list[str], list[dict], list[dict[str, str]]]:
    """Users who connected a source, their close payloads and their tickets."""
    users = [f"current-{i:03d}@example.com" for i in range(USERS)]
    for user in users:
        chaos.standin.state.auth.connect(user, [SOURCE])
    payload = {
        "sessionResults": {"connectedSources": [{"name": SOURCE, "id": "c1"}]},
        "currentConnections": [{"name": SOURCE, "id": "c1"}],
    }
    tickets = [factories.ticket(u, ttl_s=3600) for u in users]
    return users, [payload] * len(users), tickets


#: The access finishes' records are found by the ticket's user.
BY_USER = "expected_client_user_id"


def _stored(chaos: Chaos) -> int:
    return chaos.stored_count(BY_USER)


def _verify(chaos: Chaos, scenario: str, users: list[str], *, refetch_bound: int) -> Tally:
    """Every user's finish ended stored with the token the provider issued last; at most
    `refetch_bound` users fetched twice; one event each; no token or secret in clear."""
    chaos.wait_ended(set(users), 240, by=BY_USER)
    states = chaos.states(BY_USER)
    assert {u: s for u, (s, _) in states.items() if s != RequestState.SUCCEEDED} == {}
    auth = chaos.standin.state.auth
    stored = {u.client_user_id: u for u in stored_users(chaos.db_url).values()}
    for user in users:
        assert stored[user].access_token == auth.newest_access[user], user
        assert stored[user].access_expires_us is not None
    fetches = [auth.mints[f"access:{u}"] for u in users]
    twice = [u for u in users if auth.mints[f"access:{u}"] > 1]
    refetched = len(twice)
    with session_factory(chaos.db_url)() as db:
        rows = db.execute(
            text("SELECT request_id, expected_client_user_id, attempts, state FROM sessions")
        ).all()
    assert max(fetches) <= 2 and refetched <= refetch_bound, (
        refetched,
        max(fetches),
        [r for r in rows if r[1] in twice],
        str(chaos.tmp),
    )
    chaos.wait_relayed()
    ids: dict[str, set[str]] = {}
    for entry in stream_entries(chaos.r):
        if entry.get("clientUserId", "").startswith("current-"):
            assert (entry["type"], entry["connectedSources"]) == ("connect.completed", SOURCE)
            ids.setdefault(entry["clientUserId"], set()).add(entry["eventId"])
    assert ids.keys() == set(users) and all(len(v) == 1 for v in ids.values())
    issued = list(auth.access)
    assert_no_secrets(
        [CLIENT_SECRET, *issued],
        redis_client=chaos.r,
        db_url=chaos.db_url,
        files=[*chaos.aof_files(), *chaos.logs()],
    )
    return Tally(
        scenario,
        sent=len(users),
        accepted=len(users),
        stored=len(stored.keys() & set(users)),
        answer_lost=0,
        duplicated=refetched,
        lost=0,
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sigkill_of_every_worker_loses_no_access_finish(chaos: Chaos) -> None:
    chaos.standin.state.faults.latency_ms = 100
    chaos.start(HUMANCONNECT_TICKET_KEY=TICKET_KEY)
    users, payloads, tickets = _users(chaos)
    sending = chaos.send_in_background(payloads, headers=tickets)
    wait_for(lambda: _stored(chaos) >= 60, 120, interval=0.2, what="progress")
    workers = len(chaos.workers)
    chaos.signal_workers(signal.SIGKILL)
    at_signal = _stored(chaos)
    assert at_signal < USERS, "the kill must land mid-burst"
    for _ in range(2):
        chaos.start_worker()
    assert {s.status for s in sending.result(120)} == {202}
    # A fetch whose answer died with its worker is made again: at most one per thread
    # that was running.
    tally = _verify(chaos, "current-flow-sigkill-workers", users, refetch_bound=workers * THREADS)
    tally.extra["stored_when_signalled"] = at_signal
    tally.report()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_redis_killed_mid_burst_keeps_every_access_finish(chaos: Chaos) -> None:
    chaos.standin.state.faults.latency_ms = 50
    chaos.start(HUMANCONNECT_TICKET_KEY=TICKET_KEY)
    users, payloads, tickets = _users(chaos)
    sending = chaos.send_in_background(payloads, headers=tickets, rate=100)
    wait_for(lambda: _stored(chaos) >= 30, 60, interval=0.1, what="burst under way")
    chaos.redis.kill()
    time.sleep(3)
    chaos.redis.start()
    results = sending.result(120)
    assert {s.status for s in results} <= {202, 503}, {s.status for s in results}
    refused = [i for i, s in enumerate(results) if s.status == 503]
    # The client sends the refused ones again: taken now, or answered as the finish of
    # theirs already queued.
    deadline = time.monotonic() + 60
    while refused:
        assert time.monotonic() < deadline, f"{len(refused)} still refused"
        again = chaos.send([payloads[i] for i in refused], headers=[tickets[i] for i in refused])
        refused = [i for i, s in zip(refused, again, strict=True) if s.status == 503]
        time.sleep(0.5)
    # Nothing between the provider's answer and the store needs Redis: never a second fetch.
    tally = _verify(chaos, "current-flow-redis-sigkill", users, refetch_bound=0)
    tally.extra["refused_503_during_outage"] = sum(1 for s in results if s.status == 503)
    tally.report()
