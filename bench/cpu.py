"""CPU per unit of work, read from each process's own CPU clock (/proc/<pid>/stat, user and
system time of all its threads) before and after the work: on a shared machine the clocks
hold where wall-clock latencies and rates drift. Each figure beside its floor, same run:

- the web: finishes sent open loop into the web alone (no worker: the queue just fills), CPU
  per accepted finish; the floor, a trivial ASGI app (bench/trivial_app.py) behind the same
  uvicorn command line taking the same load. Then both saturated (100 in flight at once, as
  in a burst), where requests overlap and share the loop's turns and the Redis writes;
- the worker: a backlog drained unthrottled (0 ms upstream), and at the default upstream
  limit (20/s, 200 ms upstream), CPU per exchange; the floor, no-op Celery tasks through a
  worker with the same settings (bench/noop_app.py), CPU per task. Each drain also splits
  its CPU into user and system time and counts how often the worker's threads were switched
  out per exchange; the unthrottled drain runs again with one thread, since 32 threads that
  all have work hand the GIL over at every blocking call (bench/harness.py `CpuCounters`);
- the exchange alone: `Exchanger.run` over fresh sessions one after another in one thread of
  this process, against the same stand-in, Redis and database, that thread's CPU per
  exchange: what the exchange's own steps cost, without Celery's per-message work or 32
  threads taking turns at the GIL. Not in it: opening the queued token (the task does that
  before `run`) and the batched "sent" marks of the events, which a timer thread writes.

Then, in separate passes so that sampling costs no measured figure, a py-spy profile of the
web and of the worker doing the same work (bench/profile.py): its top entries go in the record.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import SERVICE_APP, Stack, body, closed_loop, cpu_s, open_loop, stack
from bench.profile import Profile, py_spy, summary
from bench.throughput import DEFAULT_MAX_RPS, LIMITED_SESSIONS, drain_noop, drain_one
from humanconnect.exchange import Exchanger
from humanconnect.request import ExchangeRequest, Job
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Faults
from humanconnect.settings import Settings
from humanconnect.storage.db import dispose_all
from humanconnect.upstream.guard import free_slot

#: Finishes into the web, and at what rate (open loop): the issue's measurement.
FINISHES = 6000
RATE = 600
#: Requests in flight at once for the saturated pass (a burst's overlap).
SATURATED = 100
#: Sessions drained unthrottled, and no-op tasks beside them.
DRAIN_SESSIONS = 3000
#: Finishes, and sessions drained, in each profiling pass.
PROFILED = 3000
#: Sessions exchanged one by one in this process, after a warm-up of WARM_EXCHANGES.
ALONE = 2000
#: Sessions per batch in the drains that run them together (HUMANCONNECT_EXCHANGE_BATCH).
BATCH = 16
WARM_EXCHANGES = 200
TRIVIAL_APP = "bench.trivial_app:app"


def _web_cpu(
    s: Stack,
    app: str,
    run: str,
    finishes: int,
    profile: Path | None,
    in_flight: int | None = None,
) -> dict[str, Any]:
    """`finishes` sent open loop at RATE (or closed loop, `in_flight` at once) into a freshly
    started `app`, after a warm-up of 200 not counted: its CPU per request answered 2xx."""
    s.stop("web")
    url = s.start_web(app=app)
    web = s.procs["web"]
    asyncio.run(closed_loop(url, [body(i, run + "w") for i in range(200)], 50))
    bodies = [body(i, run) for i in range(finishes)]
    with Profile(web.pid, profile):
        cpu0 = cpu_s(web.pid)
        if in_flight:
            result = asyncio.run(closed_loop(url, bodies, in_flight))
        else:
            result = asyncio.run(open_loop(url, bodies, RATE))
        cpu = cpu_s(web.pid) - cpu0
    answered = sum(n for code, n in result["codes"].items() if 200 <= code < 300)
    return {
        "requests": finishes,
        "codes": result["codes"],
        "p99_ms": result["p99_ms"],
        "cpu_s": cpu,
        "cpu_ms_per_request": cpu * 1000 / max(1, answered),
    }


def _exchange_alone(s: Stack, sessions: int) -> dict[str, Any]:
    """`sessions` fresh sessions exchanged one after another by `Exchanger.run` in this
    thread, against the stack's stand-in (0 ms), Redis and database: this thread's CPU per
    exchange (each succeeds, or the figure is refused). The token is opened before the
    clock starts, and the events' "sent" marks are written by their own timer thread."""
    ours = ("HUMANAPI_", "HUMANCONNECT_", "REDIS_", "DATABASE_URL")
    rt = Runtime(Settings.model_validate({k: v for k, v in s.env.items() if k.startswith(ours)}))
    # The limit's slot at once: its dispatcher thread is the worker's cost, not the exchange's.
    exchanger = Exchanger(rt, free_slot)

    def jobs(run: str, n: int) -> list[Job]:
        out = []
        for i in range(n):
            finish = body(i, run)
            sealed = rt.cipher.seal(finish["sessionToken"])
            request = ExchangeRequest(
                request_id=f"{run}-{i}",
                human_id=finish["humanId"],
                client_id=finish["clientId"],
                sealed_session_token=sealed,
                received_us=time.time_ns() // 1000,
            )
            out.append(Job.opened(request, rt.cipher.open(sealed)))
        return out

    for job in jobs("xw", WARM_EXCHANGES):
        exchanger.run(job)
    measured = jobs("xa", sessions)
    cpu0 = time.thread_time()
    outcomes = [exchanger.run(job).state for job in measured]
    cpu = time.thread_time() - cpu0
    exchanger.announce.sent.flush()
    if set(outcomes) != {"succeeded"}:
        raise RuntimeError(f"exchanges alone did not all succeed: {sorted(set(outcomes))}")
    return {"sessions": sessions, "cpu_s": cpu, "cpu_s_per_exchange": cpu / sessions}


def cpu_scenario(finishes: int = FINISHES, drained: int = DRAIN_SESSIONS) -> dict[str, Any]:
    """The web's CPU per finish and the worker's per exchange, each beside its floor; then a
    profile of each (when py-spy is installed)."""
    out: dict[str, Any] = {}
    s = stack(Faults())
    try:
        out["web"] = _web_cpu(s, SERVICE_APP, "c1", finishes, None)
        out["trivial ASGI app"] = _web_cpu(s, TRIVIAL_APP, "c2", finishes, None)
        out["web, saturated"] = _web_cpu(s, SERVICE_APP, "c3", finishes, None, SATURATED)
        out["trivial ASGI app, saturated"] = _web_cpu(
            s, TRIVIAL_APP, "c4", finishes, None, SATURATED
        )
    finally:
        s.close()
    for suffix in ("", ", saturated"):
        out[f"web vs trivial{suffix}"] = (
            out[f"web{suffix}"]["cpu_ms_per_request"]
            / out[f"trivial ASGI app{suffix}"]["cpu_ms_per_request"]
        )
    s = stack(Faults())
    try:
        out["exchange alone"] = _exchange_alone(s, ALONE)
    finally:
        dispose_all()  # the database's pool of this process, before its files go
        s.close()
    out["worker, unthrottled"] = drain_one(0, drained, prepare=_alone)
    out["worker, unthrottled, 1 thread"] = drain_one(0, drained, concurrency=1, prepare=_alone)
    out[f"worker, unthrottled, batches of {BATCH}"] = drain_one(0, drained, prepare=_batches)
    out[f"worker, limit {DEFAULT_MAX_RPS}/s"] = drain_one(
        200, LIMITED_SESSIONS, max_rps=DEFAULT_MAX_RPS, prepare=_alone
    )
    out[f"worker, limit {DEFAULT_MAX_RPS}/s, batches of {BATCH}"] = drain_one(
        200, LIMITED_SESSIONS, max_rps=DEFAULT_MAX_RPS, prepare=_batches
    )
    out["no-op tasks"] = drain_noop(drained)
    noop_ms = out["no-op tasks"]["cpu_s_per_task"] * 1000
    for suffix in ("", f", batches of {BATCH}"):
        out[f"worker unthrottled vs no-op{suffix}"] = (
            out[f"worker, unthrottled{suffix}"]["cpu_s_per_exchange"] * 1000 / noop_ms
        )
    if py_spy() is not None:
        out["profiles"] = _profiles()
    return out


def _batches(s: Stack) -> None:
    """The worker runs its sessions BATCH at a time (worker/batch.py)."""
    s.env["HUMANCONNECT_EXCHANGE_BATCH"] = str(BATCH)


def _alone(s: Stack) -> None:
    """The worker runs each session's message alone, as before batches."""
    s.env["HUMANCONNECT_EXCHANGE_BATCH"] = "1"


def _profiles() -> dict[str, Any]:
    """py-spy's top entries for the web taking finishes and the worker draining, unthrottled."""
    where = Path(tempfile.mkdtemp(prefix="hc-bench-profiles-"))
    s = stack(Faults())
    try:
        _web_cpu(s, SERVICE_APP, "p1", PROFILED, where / "web.txt")
    finally:
        s.close()
    drain_one(0, PROFILED, profile=where / "worker.txt", prepare=_alone)
    drain_one(0, PROFILED, profile=where / "worker-batches.txt", prepare=_batches)
    drain_noop(PROFILED, profile=where / "noop.txt")
    return {
        "web": summary(where / "web.txt"),
        "worker": summary(where / "worker.txt"),
        f"worker, batches of {BATCH}": summary(where / "worker-batches.txt"),
        "no-op tasks": summary(where / "noop.txt"),
    }
