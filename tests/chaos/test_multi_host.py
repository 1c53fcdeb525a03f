"""Several hosts, as docs/operations/deployment.md lays them out: two `web`s (one
with its clock 30 s ahead, through libfaketime), three workers and two beats on one Redis and
PostgreSQL. A burst of 1,000 finishes goes to both webs; 100 users finish twice, the first
session through the clock-ahead web and the later one through the other. Mid-burst one web,
one worker and the beat that holds the lock are SIGKILLed; the client sends what the dead web
left unanswered to the live one, as a load balancer would; after the surviving beat has taken
over, a second worker is killed.

Every accepted session ends once, none is exchanged twice, the later session's tokens are the
ones kept for every user who finished twice, and the periodic jobs keep running on the
surviving beat.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from humanconnect.cli.procs import commands
from humanconnect.crypto import session_hash
from humanconnect.states import FINAL, ErrorKind, RequestState
from humanconnect.storage.db import session_factory
from tests.support.chaos import Chaos, Tally, bodies
from tests.support.env import CI, ROOT, wait_for
from tests.support.processes import Process, start_web
from tests.support.scan import stored_users

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("faketime") and not CI, reason="needs faketime"),
]

ACQUIRED = "beat: Acquired lock"
SINGLES = 800
#: How far ahead the one web's clock runs.
LEAD_S = 30
TWICE = 100


def _rows(db_url: str) -> dict[str, list[tuple[str, str, int, str | None]]]:
    """humanId -> [(session hash, state, received_us, error kind)] of every session row."""
    rows: dict[str, list[tuple[str, str, int, str | None]]] = {}
    with session_factory(db_url)() as db:
        found = db.execute(
            text("SELECT human_id, session_hash, state, received_us, error_kind FROM sessions")
        ).all()
    for human, digest, state, received, kind in found:
        rows.setdefault(human, []).append((digest, state, received, kind))
    return rows


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_one_web_worker_and_beat_killed_on_several_hosts_loses_nothing(
    chaos: Chaos, tmp_path: Path
) -> None:
    chaos.standin.state.faults.latency_ms = 100
    chaos.start(workers=3)
    ahead, ahead_url = start_web(
        chaos.env, ROOT, tmp_path / "web-ahead.log", prefix=("faketime", "-f", f"+{LEAD_S}s")
    )
    beat2 = Process("beat", commands(0, tmp_path)["beat"], chaos.env, ROOT, tmp_path / "beat2.log")
    try:
        assert chaos.beat is not None
        first_beat = chaos.beat
        wait_for(lambda: ACQUIRED in first_beat.output(), 30, what="the first beat's lock")
        singles = bodies(SINGLES)
        humans = bodies(TWICE)
        later = [{**b, "sessionToken": b["sessionToken"][::-1]} for b in humans]
        # The first sessions go through the web whose clock runs LEAD_S ahead; the later ones
        # through the right-clocked web, well within that lead after (sending 200 takes a
        # couple of seconds, more on a busy machine): by the web's clocks
        # each later session would be the older one.
        sent_first = time.monotonic()
        assert {s.status for s in chaos.send(humans, url=ahead_url)} == {202}
        assert {s.status for s in chaos.send(later)} == {202}
        assert time.monotonic() - sent_first < LEAD_S - 5

        half = SINGLES // 2
        to_ahead = chaos.send_in_background(singles[:half], rate=150, url=ahead_url)
        to_main = chaos.send_in_background(singles[half:], rate=150)
        wait_for(lambda: chaos.stored_count() >= 250, 60, interval=0.2, what="burst under way")
        # One of each dies at once.
        ahead.signal(signal.SIGKILL)
        killed_worker = chaos.workers.pop(0)
        killed_worker.signal(signal.SIGKILL)
        first_beat.signal(signal.SIGKILL)
        killed_at = time.time()
        chaos.beat = beat2
        sent = [*to_ahead.result(120), *to_main.result(120)]
        statuses = {s.status for s in sent}
        assert statuses <= {0, 202}, statuses
        unanswered = [s.body for s in sent if s.status != 202]
        # The dead web's unanswered finishes go to the live one (a duplicate is answered 202).
        chaos.send_until_accepted(unanswered)

        # The surviving beat takes the lock, and the periodic jobs run on it.
        wait_for(lambda: ACQUIRED in beat2.output(), 30, interval=0.2, what="beat2's lock")
        takeover_s = time.time() - killed_at
        runs = {job: chaos.beat_runs(job) for job in ("reconcile-pending", "relay-events")}
        # A second worker dies after the takeover: what it held comes back all the same.
        second = chaos.workers.pop(0)
        second.signal(signal.SIGKILL)
        chaos.start_worker()

        expected = len(chaos.warm) + SINGLES + 2 * TWICE

        def ended() -> bool:
            rows = [r for found in _rows(chaos.db_url).values() for r in found]
            return len(rows) == expected and all(r[1] in FINAL for r in rows)

        wait_for(ended, 240, interval=1, what="every session to end")
        wait_for(
            lambda: all(chaos.beat_runs(job) > n for job, n in runs.items()),
            30,
            what="the reconciler and the outbox sweep sent by the surviving beat",
        )
        tally = _verify(chaos, singles, humans, later)
        tally.extra["beat_takeover_s"] = round(takeover_s, 1)
        tally.extra["resent_to_live_web"] = len(unanswered)
        tally.report()
    finally:
        ahead.stop()
        beat2.stop()


def _verify(
    chaos: Chaos,
    singles: list[dict[str, str]],
    humans: list[dict[str, str]],
    later: list[dict[str, str]],
) -> Tally:
    rows = _rows(chaos.db_url)
    stored = stored_users(chaos.db_url)
    issued = chaos.standin.state.by_session
    exchanges = chaos.standin.state.exchanges
    assert not [t for t, n in exchanges.items() if n > 1], "a session token was exchanged twice"
    lost_answers = 0
    for body in [*chaos.warm, *singles]:
        (row,) = rows[body["humanId"]]  # one row: ended once
        assert row[1] in FINAL
        if row[1] == RequestState.FAILED:
            assert row[3] == ErrorKind.ANSWER_LOST, row  # a killed worker's only loss
            lost_answers += 1
            continue
        token = issued[body["sessionToken"]]
        assert stored[body["humanId"]].access_token == token.access_token
    for first, second in zip(humans, later, strict=True):
        human = first["humanId"]
        by_hash = {r[0]: r for r in rows[human]}
        old, new = (
            by_hash[session_hash(first["sessionToken"])],
            by_hash[session_hash(second["sessionToken"])],
        )
        assert old[1] in FINAL and new[1] in FINAL, (old, new)
        # Redis's clock: the later session was received later, though the earlier one went
        # through a web LEAD_S ahead.
        assert new[2] > old[2], (old, new)
        failed = [r for r in (old, new) if r[1] == RequestState.FAILED]
        assert all(r[3] == ErrorKind.ANSWER_LOST for r in failed), failed
        lost_answers += len(failed)
        if new[1] == RequestState.SUCCEEDED:
            # The later session's tokens are kept, never the earlier one's.
            assert stored[human].access_token == issued[second["sessionToken"]].access_token
    chaos._verify_no_secrets([*singles, *humans, *later], [u.access_token for u in stored.values()])
    return Tally(
        "multi-host",
        sent=SINGLES + 2 * TWICE,
        accepted=SINGLES + 2 * TWICE,
        stored=len(stored) - len(chaos.warm),
        answer_lost=lost_answers,
        duplicated=0,
        lost=0,
    )
