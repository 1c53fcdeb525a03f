"""Saturation (how fast the web accepts) and drain (how fast workers exchange), each beside
the plain-Celery figure it is measured against."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery

from bench.harness import BIN, CpuCounters, Stack, body, closed_loop, count, stack
from bench.profile import Profile
from humanconnect.cli.procs import ALONE
from humanconnect.crypto import Cipher
from humanconnect.queue import EXCHANGE_TASK, sender
from humanconnect.redis_keys import QUEUE, UNACKED
from humanconnect.sandbox.standin import Faults
from humanconnect.settings import Settings

KWARGS = {
    "request_id": "benchbenchbenchbench00",
    "human_id": "h" * 24,
    "client_id": "c" * 40,
    "received_us": 1,
}


def _sender(s: Stack) -> Celery:
    app = sender(Settings.model_validate({"REDIS_URL": s.redis_url}), "bench-sender")
    return app


def saturation(requests: int = 5000, concurrency: int = 100) -> dict[str, Any]:
    """Closed loop at concurrency 100 (no worker: the queue just fills), against a bare loop
    of `send_task` to the same Redis with a message of the same size."""
    s = stack(Faults())
    try:
        url = s.start_web()
        asyncio.run(closed_loop(url, [body(i, "x0") for i in range(200)], concurrency))
        ours = asyncio.run(closed_loop(url, [body(i, "x1") for i in range(requests)], concurrency))
        s.sample_rss()
        app = _sender(s)
        sealed = Cipher([s.env["HUMANCONNECT_ENCRYPTION_KEYS"]]).seal("s" * 32)
        for _ in range(200):
            app.send_task(EXCHANGE_TASK, kwargs={**KWARGS, "sealed_session_token": sealed})
        started = time.perf_counter()
        for _ in range(requests):
            app.send_task(EXCHANGE_TASK, kwargs={**KWARGS, "sealed_session_token": sealed})
        bare = requests / (time.perf_counter() - started)
        return {
            "accept_rate": ours["rate"],
            "p99_ms": ours["p99_ms"],
            "codes": ours["codes"],
            "bare_send_task_rate": bare,
            "ratio": ours["rate"] / bare,
            "web_peak_rss_mb": s.peak_rss.get("web", 0.0),
        }
    finally:
        s.close()


def _stored(db_url: str) -> int:
    return count(db_url, "SELECT count(*) FROM sessions WHERE state = 'succeeded'")


def drain_one(
    latency_ms: float,
    sessions: int,
    *,
    max_rps: float = 100000,
    beat: bool = False,
    prepare: Callable[[Stack], None] | None = None,
    after: Callable[[Stack, float, int], dict[str, Any]] | None = None,
    profile: Path | None = None,
    concurrency: int = 32,
) -> dict[str, Any]:
    """Queue `sessions` through the web, then start a worker of `concurrency` threads (and
    beat, if asked) and time until all are stored, at the upstream limit `max_rps`. `prepare`
    adjusts the stack before the web starts; `after` adds figures once the drain is done
    (given the stack, when the drain started and how many sessions it drained); `profile`,
    py-spy's samples of the worker while it drains (bench/profile.py).

    Rate and CPU count from the first session stored: the worker's own start (imports, about
    1.5 s of CPU) is no exchange's cost, and would swamp a small drain's figure."""
    s = stack(Faults(latency_ms=latency_ms), max_rps=max_rps)
    try:
        if prepare is not None:
            prepare(s)
        url = s.start_web()
        queued = asyncio.run(closed_loop(url, [body(i, "d1") for i in range(sessions)], 100))
        # Under a saturating burst a few finishes may be shed with 503: drain what was queued.
        sessions = queued["codes"].get(202, 0)
        s.stop("web")
        if beat:
            s.start_beat()
        s.start_worker(concurrency)
        worker = s.procs["worker"]
        spawned = time.monotonic()
        while (first := _stored(s.env["DATABASE_URL"])) == 0 and time.monotonic() - spawned < 60:
            time.sleep(0.01)
        with Profile(worker.pid, profile):
            counters0 = CpuCounters.of(worker.pid)
            started = time.monotonic()
            while _stored(s.env["DATABASE_URL"]) < sessions and time.monotonic() - started < 300:
                s.sample_rss()
                time.sleep(0.25)
            elapsed = time.monotonic() - started
            counters = CpuCounters.of(worker.pid)
            cpu = counters.cpu_s - counters0.cpu_s
        timed = sessions - first
        result = {
            "sessions": sessions,
            "seconds": elapsed,
            "rate": timed / elapsed,
            "cpu_s_per_exchange": cpu / timed,
            "threads": concurrency,
            # User and system time, and how often the threads were switched out, per exchange.
            **counters.per(counters0, timed),
            "worker_peak_rss_mb": s.peak_rss.get("worker", 0.0),
        }
        if after is not None:
            result.update(after(s, started, sessions))
        return result
    finally:
        s.close()


def drain_noop(sessions: int, profile: Path | None = None) -> dict[str, Any]:
    """The same number of no-op tasks through a worker with the same settings (`profile`:
    py-spy's samples of it while it drains)."""
    import redis

    s = stack(Faults())
    try:
        app = _sender(s)
        for _ in range(sessions):
            app.send_task("bench.noop", kwargs=KWARGS)
        r = redis.Redis.from_url(s.redis_url)
        argv = [str(BIN / "celery"), "-A", "bench.noop_app", "worker", "-l", "WARNING", *ALONE]
        proc = s.spawn("noop", argv)
        # Timed from the first task taken, as the exchange drain is from its first stored.
        spawned = time.monotonic()
        while r.llen(QUEUE) == sessions and time.monotonic() - spawned < 60:
            time.sleep(0.005)
        left = r.llen(QUEUE) + r.hlen(UNACKED)
        with Profile(proc.pid, profile):
            counters0 = CpuCounters.of(proc.pid)
            started = time.monotonic()
            while (r.llen(QUEUE) or r.hlen(UNACKED)) and time.monotonic() - started < 120:
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            counters = CpuCounters.of(proc.pid)
            cpu = counters.cpu_s - counters0.cpu_s
        return {
            "sessions": sessions,
            "seconds": elapsed,
            "rate": left / elapsed,
            "cpu_s_per_task": cpu / left,
            **counters.per(counters0, left),
        }
    finally:
        s.close()


#: The default upstream limit (HUMANAPI_MAX_RPS), and how many sessions its drain takes: 20 s.
DEFAULT_MAX_RPS = 20
LIMITED_SESSIONS = 400


def drain(sessions: int = 5000) -> dict[str, Any]:
    """5,000 queued sessions exchanged at 0 ms and 100 ms upstream, beside no-op tasks; and
    400 at the default limit (20 calls/s, 200 ms upstream), for the CPU an exchange costs
    when most of its time is waiting for a slot."""
    zero = drain_one(0, sessions)
    hundred = drain_one(100, sessions)
    limited = drain_one(200, LIMITED_SESSIONS, max_rps=DEFAULT_MAX_RPS)
    noop = drain_noop(sessions)
    return {
        "0 ms": zero,
        "100 ms": hundred,
        f"limit {DEFAULT_MAX_RPS}/s": limited,
        "no-op tasks": noop,
        "0 ms vs no-op": zero["rate"] / noop["rate"],
        "100 ms vs 0 ms": hundred["rate"] / zero["rate"],
        "cpu at the limit vs 0 ms": limited["cpu_s_per_exchange"] / zero["cpu_s_per_exchange"],
    }
