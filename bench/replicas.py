"""Replicas: what Redis high availability costs a finish, and how long a failover refuses
them, on one Sentinel group (humanconnect/cli/redis_group.py: a primary, 2 replicas, 3
Sentinels) in one run.

The cost: the web through the Sentinels with HUMANCONNECT_REDIS_MIN_REPLICAS=1 (each accept
answered 202 only once a replica holds it: WAIT pipelined with the accept script,
producer/claims.py) against the same with MIN_REPLICAS=0, and a plain REDIS_URL to the same
primary as the baseline of the Sentinels themselves. Each variant gets a web of its own,
started with the contract's variables only, then a warm-up, an open loop (300 finishes/s for
10 s, latency from each finish's scheduled time) and a saturation closed loop (5,000 at
concurrency 100, as bench/throughput.py's `saturation`: finishes accepted per second). No
worker: the queue just fills. The variants alternate over `rounds` rounds, in reverse order
every other round, so the machine's drift falls on each alike; a variant's figures are the
mean of its rounds', and the ratios are MIN_REPLICAS=1 over MIN_REPLICAS=0.

The failover: a web with MIN_REPLICAS=1 (the HA setting), a client posting a finish every
50 ms (each on its own schedule, not waiting for the previous answer), the primary SIGKILLed;
the figure is the seconds from the kill to the first 202 to a finish sent after it. Then
the old primary is restarted, and the next run waits until it is a replica again, every
Sentinel names the same primary with 2 replicas up, and twice the Sentinels' failover
timeout has passed since the last kill (until then a Sentinel would not fail the same master
over again, and the wait would be the bench's, not the failover's)."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    Stack,
    alternating_rounds,
    body,
    closed_loop,
    ratios,
    stack,
    summarise,
    ticket_headers,
    web_pass,
)
from humanconnect.cli.procs import wait_ready
from humanconnect.cli.redis_group import RedisGroup
from humanconnect.sandbox.standin import Faults

RATE = 300
SECONDS = 10
SATURATION_REQUESTS = 5000
CONCURRENCY = 100
WARM = 200
ROUNDS = 2
FAILOVER_RUNS = 5
#: The failover client's interval between finishes.
EVERY_S = 0.05
#: A run with no 202 this long after the kill is reported as none.
FAILOVER_GIVE_UP_S = 60.0
#: RedisGroup's default: a Sentinel fails the same master over again only 2× this later.
FAILOVER_TIMEOUT_MS = 4000
#: How long the group may take to be whole again after a run (a hang guard).
HEAL_TIMEOUT_S = 120.0

URL_BASELINE = "REDIS_URL to the primary, MIN_REPLICAS=0"
UNREPLICATED = "Sentinels, MIN_REPLICAS=0"
REPLICATED = "Sentinels, MIN_REPLICAS=1"


def _variant_env(group: RedisGroup, variant: str) -> dict[str, str]:
    """The contract's Redis variables for `variant`, nothing else."""
    if variant == URL_BASELINE:
        return {"REDIS_URL": f"redis://127.0.0.1:{group.primary().port}/0"}
    return {
        "REDIS_SENTINELS": group.sentinels_env,
        "REDIS_SENTINEL_MASTER": group.master_name,
        "HUMANCONNECT_REDIS_MIN_REPLICAS": "1" if variant == REPLICATED else "0",
    }


def _use(s: Stack, env: dict[str, str]) -> None:
    for name in ("REDIS_URL", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER"):
        s.env.pop(name, None)
    s.env.pop("HUMANCONNECT_REDIS_MIN_REPLICAS", None)
    s.env.update(env)


def _measure(
    s: Stack, group: RedisGroup, variant: str, run: str, rate: float, seconds: float, requests: int
) -> dict[str, Any]:
    """One variant's web: warm-up, open loop, saturation; then the web stopped."""
    _use(s, _variant_env(group, variant))
    url = s.start_web()
    try:
        return web_pass(s, url, run, rate=rate, seconds=seconds, requests=requests)
    finally:
        s.stop("web")


def _cost(
    s: Stack, group: RedisGroup, rounds: int, rate: float, seconds: float, requests: int
) -> dict[str, Any]:
    runs = alternating_rounds(
        [URL_BASELINE, UNREPLICATED, REPLICATED],
        rounds,
        lambda variant, run: _measure(s, group, variant, f"r{run}", rate, seconds, requests),
    )
    out: dict[str, Any] = {variant: summarise(measured) for variant, measured in runs.items()}
    rep, unrep, url = out[REPLICATED], out[UNREPLICATED], out[URL_BASELINE]
    out["replicated / unreplicated"] = ratios(rep, unrep)
    out["sentinels / REDIS_URL"] = ratios(unrep, url)
    return out


class _Poster:
    """A finish every `EVERY_S` through the web, in a thread of its own, each answer noted
    with when it was sent and when it came (time.monotonic())."""

    def __init__(self, url: str, run: str):
        self.url = url
        self.run = run
        self.answers: list[tuple[float, float, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._post()), daemon=True)

    def start(self) -> _Poster:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)

    def first_202_sent_after(self, t: float) -> float | None:
        """When the first 202 to a finish sent at or after `t` came."""
        return min(
            (got for sent, got, code in self.answers if sent >= t and code == 202), default=None
        )

    async def _post(self) -> None:
        count = int((FAILOVER_GIVE_UP_S + 30) / EVERY_S)
        bodies = [body(i, self.run) for i in range(count)]
        tickets = ticket_headers(bodies)
        timeout = aiohttp.ClientTimeout(total=10)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(self.url, connector=conn, timeout=timeout) as session:

            async def one(i: int) -> None:
                sent = time.monotonic()
                try:
                    async with session.post(
                        "/connect/finish", json=bodies[i], headers=tickets[i]
                    ) as resp:
                        await resp.read()
                        code = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    code = 0
                self.answers.append((sent, time.monotonic(), code))

            tasks = []
            start = time.monotonic()
            for i in range(count):
                if self.done.is_set():
                    break
                await asyncio.sleep(max(0.0, start + i * EVERY_S - time.monotonic()))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)


def _whole(group: RedisGroup, replicas: int) -> bool:
    """Every Sentinel names the same primary, a master, and finds `replicas` replicas up
    (for `wait_ready`, which takes an error as not yet)."""
    primaries = set()
    for sentinel in group.sentinels:
        _, port = sentinel.ask("SENTINEL GET-MASTER-ADDR-BY-NAME", group.master_name)
        listed = sentinel.ask("SENTINEL SLAVES", group.master_name)
        up = [r for r in listed if not (r["is_sdown"] or r["is_disconnected"])]
        if len(up) != replicas:
            return False
        primaries.add(int(port))
    return len(primaries) == 1 and group.primary().role() == "master"


def _one_failover(s: Stack, group: RedisGroup, url: str, run: str) -> dict[str, Any]:
    """The primary SIGKILLed under the poster's finishes; the old primary then restarted."""
    poster = _Poster(url, run).start()
    try:
        time.sleep(1.0)  # finishes accepted before the kill: the web is fine
        old = group.primary()
        group.kill(old)  # returns once the process is gone
        killed = time.monotonic()
        new = group.wait_for_new_primary(old, FAILOVER_GIVE_UP_S)
        promoted = time.monotonic() - killed
        wait_ready(
            lambda: poster.first_202_sent_after(killed) is not None,
            [s.procs["web"]],
            max(0.0, killed + FAILOVER_GIVE_UP_S - time.monotonic()),
            interval=0.05,
        )
        time.sleep(0.5)
    finally:
        poster.stop()
    first = poster.first_202_sent_after(killed)
    group.restart(old)
    return {
        "killed": old.name,
        "promoted": new.name,
        "killed_at": killed,
        "sentinels_promoted_s": promoted,
        "first_202_s": None if first is None else first - killed,
        "before_the_kill_codes": _tally(c for sent, _, c in poster.answers if sent < killed),
        "after_the_kill_codes": _tally(c for sent, _, c in poster.answers if sent >= killed),
    }


def _failover(s: Stack, group: RedisGroup, runs: int) -> dict[str, Any]:
    _use(s, _variant_env(group, REPLICATED))
    url = s.start_web()
    replicas = len(group.data) - 1
    results: list[dict[str, Any]] = []
    try:
        asyncio.run(closed_loop(url, [body(i, "fw") for i in range(WARM)], CONCURRENCY))
        for n in range(runs):
            if not wait_ready(lambda: _whole(group, replicas), [], HEAL_TIMEOUT_S, interval=0.2):
                raise RuntimeError(f"the group was not whole again\n{group.log_tails()}")
            if results:
                again = results[-1].pop("killed_at") + 2 * FAILOVER_TIMEOUT_MS / 1000 + 1
                time.sleep(max(0.0, again - time.monotonic()))
            results.append(_one_failover(s, group, url, f"f{n}"))
        if results:
            results[-1].pop("killed_at", None)
    finally:
        s.stop("web")
    # The group whole again for whoever uses it next.
    healed = wait_ready(lambda: _whole(group, replicas), [], HEAL_TIMEOUT_S, interval=0.2)
    took = [r["first_202_s"] for r in results if r["first_202_s"] is not None]
    return {
        "runs": results,
        "first_202_s": [r["first_202_s"] for r in results],
        "median_s": statistics.median(took) if took else None,
        "max_s": max(took) if took else None,
        "runs_without_a_202": len(results) - len(took),
        "give_up_s": FAILOVER_GIVE_UP_S,
        "group_whole_after": healed,
    }


def _tally(codes: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for code in codes:
        out[code] = out.get(code, 0) + 1
    return dict(sorted(out.items()))


def replicas_scenario(
    *,
    rate: float = RATE,
    seconds: float = SECONDS,
    saturation_requests: int = SATURATION_REQUESTS,
    rounds: int = ROUNDS,
    failover_runs: int = FAILOVER_RUNS,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="hc-bench-ha-"))
    group = RedisGroup(workdir, failover_timeout_ms=FAILOVER_TIMEOUT_MS)
    group.start()
    s: Stack | None = None
    try:
        s = stack(Faults(), redis_env=_variant_env(group, UNREPLICATED))
        out = _cost(s, group, rounds, rate, seconds, saturation_requests)
        out["failover"] = _failover(s, group, failover_runs)
        out["web_peak_rss_mb"] = s.peak_rss.get("web", 0.0)
        out["sizes"] = {
            "rate": rate,
            "seconds": seconds,
            "saturation_requests": saturation_requests,
            "rounds": rounds,
            "failover_runs": failover_runs,
        }
        return out
    finally:
        if s is not None:
            s.close()
        group.stop()
