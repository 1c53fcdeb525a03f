"""The database unreachable for 15 seconds mid-burst."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.support.chaos import SESSIONS, Chaos, bodies
from tests.support.env import wait_for
from tests.support.servers import TcpProxy

# Each scenario is a whole deployment and a burst of 1,000 sessions: the full suite only.
pytestmark = pytest.mark.slow

OUTAGE_S = 15


def _burst_around(chaos: Chaos, outage) -> tuple[list[dict[str, str]], int, int]:
    """A burst; once a fifth is stored the database goes away for OUTAGE_S seconds."""
    sent = bodies()
    sending = chaos.send_in_background(sent)
    wait_for(lambda: chaos.stored_count() >= SESSIONS // 5, 120, interval=0.2, what="progress")
    before = chaos.stored_count()
    outage()
    after = chaos.stored_count()
    assert after < SESSIONS, "the outage must land mid-burst"
    assert {s.status for s in sending.result(120)} == {202}
    chaos.wait_ended({b["humanId"] for b in sent}, 240)
    return sent, before, after


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("batch", [1, 8])
def test_postgresql_cut_for_15_s_marks_nothing_failed(chaos: Chaos, batch: int) -> None:
    """Every connection broken and new ones refused for 15 s: all stored once it returns
    (with `batch` 8, the workers run their sessions eight at a time)."""
    host, _, rest = chaos.db_url.rpartition("@")[2].partition(":")
    port = int(rest.partition("/")[0])
    proxy = TcpProxy(host, port).open()
    through_proxy = chaos.db_url.replace(f"@{host}:{port}/", f"@127.0.0.1:{proxy.port}/")
    chaos.standin.state.faults.latency_ms = 50
    chaos.start(database_url=through_proxy, HUMANCONNECT_EXCHANGE_BATCH=str(batch))

    def outage() -> None:
        proxy.cut()
        time.sleep(OUTAGE_S)
        proxy.open()

    try:
        sent, before, after = _burst_around(chaos, outage)
        # With the database still reachable: the verdict waits for the service to mark the
        # last events sent (batched, within half a second), which it does through the proxy.
        tally = chaos.verify(
            "postgresql-cut-15s" + (f"-batch{batch}" if batch > 1 else ""),
            len(sent),
            sent,
            may_lose_answers=False,
        )
    finally:
        proxy.cut()
    assert (chaos.largest_batch() > 1) is (batch > 1)
    tally.extra.update(stored_when_cut=before, stored_when_back=after)
    tally.report()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_locked_for_15_s_marks_nothing_failed(chaos: Chaos) -> None:
    """Another process holds SQLite's write lock for 15 s (a backup, a long migration):
    writers wait or fail and retry; all stored once it is released, none failed."""
    chaos.standin.state.faults.latency_ms = 50
    chaos.start()
    path = chaos.db_url.removeprefix("sqlite:///")

    def outage() -> None:
        holder = sqlite3.connect(path, isolation_level=None, timeout=30)
        holder.execute("BEGIN EXCLUSIVE")
        time.sleep(OUTAGE_S)
        holder.execute("ROLLBACK")
        holder.close()

    sent, before, after = _burst_around(chaos, outage)
    tally = chaos.verify("sqlite-locked-15s", len(sent), sent, may_lose_answers=False)
    tally.extra.update(stored_when_locked=before, stored_when_released=after)
    tally.report()
