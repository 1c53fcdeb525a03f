"""The upstream limit is one limit however many workers run: five real worker processes of 32
threads each, every one at HUMANAPI_MAX_RPS=20, drain one backlog into one stand-in, which
never sees more than 20 calls a second over any 10 s, and gets far more than a limit split
between the processes would let through.

What the limiter controls is when each call may leave (humanconnect/upstream/limiter.py);
the stand-in stamps arrivals. A niced worker's thread that passed its slot's lateness check
can still wait for its process's GIL before the request leaves, so a single second may hold
one call more (21 seen once in CI, with 285 calls in the 15 s span: the pace itself was
right). Over 10 s the slots' spacing leaves room for half a second of such delay (in one
second, 50 ms), so that window is the assertion and the worst single second is a figure."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from humanconnect.sandbox.standin import Running, no_collection
from humanconnect.upstream.limiter import slot_interval
from tests import factories
from tests.support import figures
from tests.support.env import ROOT
from tests.support.lag import LoopLag
from tests.support.processes import Deployment, Process, start_worker
from tests.support.scan import state_counts
from tests.support.traffic import burst

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

MAX_RPS = 20
#: The pace the workers actually keep at MAX_RPS (the limiter's spacing): 19.4 calls/s.
PACE = 1 / slot_interval(MAX_RPS)
WORKERS = 5
THREADS = 32
#: More than the workers' start, settling, the watched span and the 160 sessions their
#: threads hold at its end take (about 3 + 2 + 15 s at PACE, + 160): never dry while watched.
BACKLOG = 700
#: The span watched, from SETTLE_S after every worker is up: their first tasks (each
#: process's first connections, on the same CPUs as the stand-in) jitter the calls' arrival,
#: 21 stamped within a second seen there. Past it, 20 at most. With the CPUs busy elsewhere
#: the workers (nice 10) send up to ~30 ms after their slots: with 3 % spacing and the lock
#: renewed between slot and send, 21 were seen; the limiter now counts the renewal against
#: the slot and spaces slots 5 % apart (humanconnect/upstream/limiter.py).
SETTLE_S = 2.0
WATCH_S = 15.0
#: How the limit could be wrong, and what tells it: a per-process limit lets five times the
#: calls through (the window check fails); one divided between the processes lets a fifth.
#: The span must hold more than twice that fifth, a structural bound rather than a measure
#: of this machine's speed (how much of PACE · WATCH_S it kept is a figure: 99.9 % seen on
#: 2 CPUs; the workers that wake late on a busy machine lose their slots).
SPLIT_SHARE = 1 / WORKERS
#: The window the limit is asserted over: MAX_RPS · WINDOW_S calls at most. One call more
#: takes MAX_RPS · WINDOW_S + 1 slots, which span WINDOW_S · PACING seconds, landing in
#: WINDOW_S: a send half a second later than another's (in one second: 50 ms).
WINDOW_S = 10.0

WorkerStarter = Callable[[dict[str, str], int], list[Process]]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerStarter]:
    """Start `n` more workers on a deployment's environment, together; all stopped after."""
    started: list[Process] = []

    def start(env: dict[str, str], n: int) -> list[Process]:
        def one(i: int) -> Process:
            proc = start_worker(env, ROOT, tmp_path / f"worker-{i}.log", concurrency=THREADS)
            started.append(proc)
            return proc

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    yield start
    # Killed: their threads hold sessions still waiting for slots, which a warm shutdown
    # waits out at the pace (160 / PACE = 8 s), and the thread pool has no cold shutdown
    # (SIGQUIT: "does not implement kill_job"). Nothing is checked after this.
    for proc in started:
        proc.signal(signal.SIGKILL)
    for proc in started:
        proc.stop()


def test_five_worker_processes_share_one_upstream_limit(
    deploy: Callable[..., Deployment], workers: WorkerStarter, standin: Running, db_url: str
) -> None:
    """700 finishes queued with no worker running, then five workers × 32 threads at
    HUMANAPI_MAX_RPS=20 started on them: over 15 s of the steady drain the stand-in sees at most
    200 calls in any 10 s, far more than a limit split between the processes would let
    through, and no session token twice."""
    d = deploy(HUMANAPI_MAX_RPS=str(MAX_RPS))
    # Queued before any worker runs, so the test process (the stand-in's) is quiet while
    # the stand-in stamps the calls.
    d.worker.stop()
    answers = burst(d.url, [factories.finish_body() for _ in range(BACKLOG)], concurrency=50)
    assert {a.status_code for a in answers} == {202}
    del answers
    assert not standin.state.call_times

    # No collection in this process while the stand-in stamps calls: it runs here, and a
    # full collection of the test's heap held its loop 150 ms, so calls that arrived on
    # their slots were stamped together (23 in a second seen, from a limiter at 20).
    with no_collection():
        started = time.monotonic()
        procs = workers(d.env, WORKERS)
        up_s = time.monotonic() - started
        # The span is the scenario: a stretch of the steady drain, however busy the machine.
        time.sleep(SETTLE_S)
        # The stand-in stamps with its loop's time: time.monotonic() of this process.
        with LoopLag(standin) as lag:
            span_from = time.monotonic()
            time.sleep(WATCH_S)
            span_to = time.monotonic()
    assert len({p.proc.pid for p in procs}) == WORKERS
    assert all(p.alive() for p in procs), [p.output()[-2000:] for p in procs if not p.alive()]

    stamps = sorted(standin.state.call_times)
    in_span = [t for t in stamps if span_from <= t < span_to]
    worst = figures.most_in_window(in_span)
    worst_window = figures.most_in_window(in_span, WINDOW_S)
    allowed = PACE * (span_to - span_from)
    counts = state_counts(db_url)
    figures.record(
        "limit_processes",
        workers=WORKERS,
        threads=THREADS,
        max_rps=MAX_RPS,
        workers_up_s=round(up_s, 1),
        span_s=round(span_to - span_from, 1),
        calls_in_span=len(in_span),
        pace_allows=round(allowed, 1),
        busy=round(len(in_span) / allowed, 3),
        worst_second=worst,
        worst_window=worst_window,
        worst_second_from_start=figures.most_in_window(stamps),
        stand_in_lag_ms=round(lag.worst * 1000),
        calls_from_start=len(stamps),
        sessions=counts,
    )
    # A stamp trails its call's arrival by at most what the stand-in's loop lost.
    assert worst_window <= MAX_RPS * WINDOW_S + PACE * lag.worst, (worst_window, worst, lag.worst)
    assert len(in_span) > 2 * SPLIT_SHARE * allowed, (len(in_span), allowed)
    # The count is the pace, not the queue running dry.
    assert len(stamps) + WORKERS * THREADS < BACKLOG
    assert max(standin.state.exchanges.values()) == 1
    assert not counts.get("failed"), counts
