"""`make bench`: scenarios measured against their baselines in the same run. Each run is
written to bench/results/<UTC start>.json (bench/record.py); the docs' benchmark page
(docs/benchmarks.md) says what each scenario measures and shows the newest run."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench import record
from bench.abuse import abuse_scenario
from bench.connect import connect_scenario
from bench.cpu import cpu_scenario
from bench.harness import body, closed_loop, open_loop, stack
from bench.knee import knee_scenario
from bench.repair import repair_scenario
from bench.replicas import replicas_scenario
from bench.retention import retention_scenario
from bench.step import RATE as STEP_RATE
from bench.step import SECONDS as STEP_SECONDS
from bench.step import step_scenario
from bench.throughput import DEFAULT_MAX_RPS, drain, saturation
from bench.tracing import print_tracing, tracing_scenario
from bench.webhooks import webhooks_scenario
from humanconnect.sandbox.standin import Faults

CHOSEN = "uvicorn httptools+uvloop"
STACKS = {
    "uvicorn httptools+uvloop": ["--http", "httptools", "--loop", "uvloop"],
    "uvicorn h11+asyncio": ["--http", "h11", "--loop", "asyncio"],
}


def _wait_stored(db_url: str, count: int, s: Any, timeout: float = 300) -> int:
    engine = create_engine(db_url)
    deadline = time.monotonic() + timeout
    stored = 0
    while time.monotonic() < deadline:
        with engine.connect() as c:
            stored = c.execute(
                text("SELECT count(*) FROM sessions WHERE state = 'succeeded'")
            ).scalar_one()
        s.sample_rss()
        if stored >= count:
            break
        time.sleep(0.5)
    engine.dispose()
    return int(stored)


def accept_burst(users: int, concurrency: int, stacks: list[str]) -> dict[str, Any]:
    """2,000 finishes at concurrency 50, per stack variant; then every one drained and stored."""
    out: dict[str, Any] = {}
    for name in stacks:
        args = STACKS[name]
        s = stack(Faults(latency_ms=200, p503=0.10, p429=0.05, retry_after_s=0.5))
        try:
            s.start_worker()
            url = s.start_web(*args)
            run = f"{abs(hash(name)) % 0xFFFF:04x}"
            # Warm up connections and imports, not counted.
            asyncio.run(closed_loop(url, [body(i, run + "w") for i in range(100)], concurrency))
            result = asyncio.run(
                closed_loop(url, [body(i, run) for i in range(users)], concurrency)
            )
            s.sample_rss()
            result["stored"] = _wait_stored(s.env["DATABASE_URL"], users + 100, s) - 100
            result["double_exchanges"] = s.standin.stats()["doubleExchanges"]
            result["peak_rss_mb"] = dict(s.peak_rss)
            out[name] = result
        finally:
            s.close()
    return out


def open_loop_burst(rate: float = 300, seconds: float = 20) -> dict[str, Any]:
    """Finishes offered at a fixed rate, each on its own schedule, against the service and
    against the guide's inline design (bench/sync_baseline.py) on the same upstream."""
    users = int(rate * seconds)
    out: dict[str, Any] = {}
    s = stack(Faults(latency_ms=200, p503=0.10, p429=0.05, retry_after_s=0.5))
    try:
        s.start_worker()
        url = s.start_web(*STACKS[CHOSEN])
        asyncio.run(closed_loop(url, [body(i, "o0") for i in range(100)], 50))
        _wait_stored(s.env["DATABASE_URL"], 100, s)
        result = asyncio.run(open_loop(url, [body(i, "o1") for i in range(users)], rate))
        s.sample_rss()
        stored = _wait_stored(s.env["DATABASE_URL"], 100 + users, s) - 100
        result["stored_share"] = stored / users
        result["peak_rss_mb"] = dict(s.peak_rss)
        out["humanconnect"] = result
        s.stop("web")
        s.stop("worker")
        s.peak_rss.clear()
        base_url = s.start_web(*STACKS[CHOSEN], app="bench.sync_baseline:app")
        asyncio.run(closed_loop(base_url, [body(i, "s0") for i in range(100)], 50))
        base = asyncio.run(open_loop(base_url, [body(i, "s1") for i in range(users)], rate))
        s.sample_rss()
        base["stored_share"] = base["codes"].get(201, 0) / users
        base["peak_rss_mb"] = dict(s.peak_rss)
        out["inline exchange (the guide's design)"] = base
    finally:
        s.close()
    return out


def wait_mode(users: int, concurrency: int) -> dict[str, Any]:
    """The same burst with and without `Prefer: wait=10`, upstream at 200 ms with faults."""
    out: dict[str, Any] = {}
    s = stack(Faults(latency_ms=200, p503=0.10, p429=0.05, retry_after_s=0.5))
    try:
        s.start_worker()
        url = s.start_web(*STACKS[CHOSEN])
        asyncio.run(closed_loop(url, [body(i, "w0") for i in range(100)], concurrency))
        _wait_stored(s.env["DATABASE_URL"], 100, s)
        for name, headers in (("without wait", None), ("Prefer: wait=10", {"Prefer": "wait=10"})):
            run = "a1" if headers is None else "b2"
            result = asyncio.run(
                closed_loop(url, [body(i, run) for i in range(users)], concurrency, headers)
            )
            s.sample_rss()
            out[name] = result
            # Drained before the next mode, so one mode's backlog doesn't slow the other.
            _wait_stored(s.env["DATABASE_URL"], 100 + users * len(out), s)
    finally:
        s.close()
    return out


SCENARIOS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "open_loop": lambda a: open_loop_burst(),
    "saturation": lambda a: saturation(),
    "drain": lambda a: drain(),
    "wait_mode": lambda a: wait_mode(1000, a.concurrency),
    "repair": lambda a: repair_scenario(a.repair_users),
    "webhooks": lambda a: webhooks_scenario(),
    "abuse": lambda a: abuse_scenario(),
    "step": lambda a: step_scenario(),
    "knee": lambda a: knee_scenario(),
    "replicas": lambda a: replicas_scenario(),
    "retention": lambda a: retention_scenario(a.retention_sessions),
    "connect": lambda a: connect_scenario(),
    "tracing": lambda a: tracing_scenario(),
    "cpu": lambda a: cpu_scenario(),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--out", default=None, help="write the record here instead of bench/results/<start>.json"
    )
    parser.add_argument(
        "--only",
        choices=[*SCENARIOS, "accept_burst"],
        action="append",
        help="run only this scenario (repeat for several); every one but accept_burst without",
    )
    parser.add_argument(
        "--repair-users",
        type=int,
        default=100_000,
        help="users for the repair scenario (the issue's 100,000 by default)",
    )
    parser.add_argument(
        "--retention-sessions",
        type=int,
        default=10_000,
        help="sessions for the retention scenario (its per-session figures don't depend on it)",
    )
    parser.add_argument(
        "--stacks",
        action="store_true",
        help="also measure the HTTP stack we did not choose (h11+asyncio), as a baseline",
    )
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    results: dict[str, Any] = {"machine": record.machine()}
    for name, run in SCENARIOS.items():
        if args.only is None or name in args.only:
            results[name] = run(args)
    # The closed-loop burst that chose the HTTP stack runs on request (it adds 3 minutes).
    if args.only and "accept_burst" in args.only:
        stacks = list(STACKS) if args.stacks else [CHOSEN]
        results["accept_burst"] = accept_burst(args.users, args.concurrency, stacks)
    wall_s = time.monotonic() - clock
    machine = results.pop("machine")
    out = Path(args.out) if args.out else None
    path = record.write(
        results, argv=argv, started=started, wall_s=wall_s, machine_at_start=machine, path=out
    )
    results["machine"] = machine
    _print_table(results)
    sys.stdout.write(f"written to {path}\n")


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"accept burst ({results['machine']['cores']} CPUs)")
    for col in (
        "stack",
        "req/s",
        "accepted",
        "p50 ms",
        "p99 ms",
        "max ms",
        "stored",
        "2x",
        "web MB",
    ):
        table.add_column(col, justify="right")
    for name, r in results.get("accept_burst", {}).items():
        table.add_row(
            name,
            f"{r['rate']:.0f}",
            f"{r['accept_rate']:.1%}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['max_ms']:.1f}",
            f"{r['stored']}/{r['requests']}",
            str(r["double_exchanges"]),
            f"{r['peak_rss_mb'].get('web', 0):.0f}",
        )
    console = Console(file=sys.stdout, width=160)
    if results.get("accept_burst"):
        console.print(table)
    wait = Table(title="1,000 finishes at concurrency 50, with and without wait mode")
    for col in ("mode", "req/s", "codes", "p50 ms", "p99 ms", "max ms"):
        wait.add_column(col, justify="right")
    for name, r in results.get("wait_mode", {}).items():
        wait.add_row(
            name,
            f"{r['rate']:.0f}",
            str(r["codes"]),
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['max_ms']:.1f}",
        )
    if results.get("wait_mode"):  # not a table of nothing when --only left it out
        console.print(wait)
    ol = Table(title="open loop: 300 finishes/s for 20 s, upstream 200 ms, 10 % 503, 5 % 429")
    for col in ("endpoint", "answers", "p50 ms", "p99 ms", "max ms", "users stored"):
        ol.add_column(col, justify="right")
    for name, r in results.get("open_loop", {}).items():
        ol.add_row(
            name,
            str(r["codes"]),
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['max_ms']:.1f}",
            f"{r['stored_share']:.1%}",
        )
    if results.get("open_loop"):
        console.print(ol)
    sat = results.get("saturation")
    if sat:
        console.print(
            f"saturation (closed loop, concurrency 100): {sat['accept_rate']:.0f} finishes/s, "
            f"bare send_task loop {sat['bare_send_task_rate']:.0f}/s, ratio {sat['ratio']:.2f}"
        )
    dr = results.get("drain")
    if dr:
        console.print(
            f"drain of 5,000: 0 ms {dr['0 ms']['rate']:.0f}/s "
            f"({dr['0 ms']['cpu_s_per_exchange'] * 1000:.1f} ms CPU each), 100 ms "
            f"{dr['100 ms']['rate']:.0f}/s, no-op tasks {dr['no-op tasks']['rate']:.0f}/s; "
            f"0 ms vs no-op {dr['0 ms vs no-op']:.2f}, 100 ms vs 0 ms {dr['100 ms vs 0 ms']:.2f}"
        )
        limited = dr[f"limit {DEFAULT_MAX_RPS}/s"]
        console.print(
            f"drain of {limited['sessions']} at HUMANAPI_MAX_RPS={DEFAULT_MAX_RPS} (200 ms "
            f"upstream): {limited['rate']:.1f}/s, "
            f"{limited['cpu_s_per_exchange'] * 1000:.1f} ms CPU each, "
            f"{dr['cpu at the limit vs 0 ms']:.2f}x the unthrottled figure"
        )
    step = results.get("step")
    if step:
        st = Table(title=f"step: idle, then finishes for {STEP_SECONDS} s")
        for col in ("variant", "rate", "answers", "p99 ms", "p99 ms of each second", "cores"):
            st.add_column(col, justify="right")
        for name, r in step.items():
            per_second = ", ".join(f"{v:.0f}" for v in r["p99_ms_per_second"])
            cores = ", ".join(f"{n} {c:.2f}" for n, c in r.get("cores", {}).items())
            rate = f"{r.get('rate', STEP_RATE)}/s"
            st.add_row(name, rate, str(r["codes"]), f"{r['p99_ms']:.1f}", per_second, cores)
        console.print(st)
    rep = Table(title="publicToken repair by one worker process")
    for col in ("run", "users", "seconds", "users/s", "limit", "share of limit", "worker MB"):
        rep.add_column(col, justify="right")
    for name, r in results.get("repair", {}).items():
        rep.add_row(
            name,
            f"{r['repaired']}/{r['users']}",
            f"{r['seconds']:.0f}",
            f"{r['users_per_s']:.0f}",
            f"{r['max_rps']:g}",
            # Far above what one worker reaches, the limit is not what is being measured.
            f"{r['share_of_limit']:.0%}" if r["max_rps"] < 2 * r["users_per_s"] else "n/a",
            f"{r['worker_peak_rss_mb']:.0f}",
        )
    if results.get("repair"):
        console.print(rep)
    knee = results.get("knee")
    if knee:
        kt = Table(
            title="knee: highest rate (steps of 100/s) with p99 ≤ 50 ms and every finish "
            "accepted, upstream 200 ms, worker at HUMANAPI_MAX_RPS=20"
        )
        for col in ("design", "knee /s", "p99 ms at each tried rate (✗: failed)"):
            kt.add_column(col, justify="right")
        for name, r in knee.items():
            if not isinstance(r, dict):
                continue
            k = r["knee_rps"]
            kt.add_row(
                name,
                "none (< 100)" if k is None else f"{k}{'+' if r['ceiling_reached'] else ''}",
                ", ".join(
                    f"{t['rate']}: {t['p99_ms']:.1f}" + ("" if t["passed"] else f" ✗ {t['codes']}")
                    for t in r["tried"]
                ),
            )
        console.print(kt)
        bound = "≥ " if knee["ratio_is_lower_bound"] else ""
        console.print(f"knee ratio, ours / inline: {bound}{knee['ratio']:.1f}")
    replicas = results.get("replicas")
    if replicas:
        _print_replicas(console, replicas)
    if results.get("tracing"):
        print_tracing(console, results["tracing"])
    cpu = results.get("cpu")
    if cpu:
        _print_cpu(console, cpu)
    ret = results.get("retention")
    if ret:
        for what, size in ret["redis_bytes_per_session"].items():
            console.print(f"retention: Redis bytes per finished session, {what}: {size:.0f}")
        console.print(
            f"retention: rows after {ret['accepted']} sessions {ret['rows_when_finished']}, "
            f"after the job {ret['rows_after_retention']}"
        )


def _print_cpu(console: Any, cpu: dict[str, Any]) -> None:
    for suffix, how in (("", "open loop"), (", saturated", "saturated")):
        web, floor = cpu[f"web{suffix}"], cpu[f"trivial ASGI app{suffix}"]
        console.print(
            f"cpu: web ({how}) {web['cpu_ms_per_request']:.3f} ms per accepted finish "
            f"({web['codes']}), trivial ASGI app {floor['cpu_ms_per_request']:.3f} ms per "
            f"request: {cpu[f'web vs trivial{suffix}']:.2f}x"
        )
    limited = next(v for k, v in cpu.items() if k.startswith("worker, limit"))
    console.print(
        f"cpu: worker {cpu['worker, unthrottled']['cpu_s_per_exchange'] * 1000:.2f} ms per "
        f"exchange unthrottled ({cpu['worker, unthrottled']['rate']:.0f}/s), "
        f"{limited['cpu_s_per_exchange'] * 1000:.2f} ms at the limit, no-op task "
        f"{cpu['no-op tasks']['cpu_s_per_task'] * 1000:.2f} ms"
    )
    one = cpu.get("worker, unthrottled, 1 thread")
    if one is not None:  # records before it was measured have none
        many = cpu["worker, unthrottled"]
        console.print(
            "cpu: worker unthrottled, "
            + "; ".join(
                f"{r['threads']} thread{'s' if r['threads'] > 1 else ''} "
                f"{r['cpu_s_per_exchange'] * 1000:.2f} ms per exchange "
                f"(user {r['user_ms_each']:.2f}, system {r['system_ms_each']:.2f} ms; "
                f"{r['switches_each']:.0f} switches, {r['preemptions_each']:.0f} preemptions)"
                for r in (many, one)
            )
        )
    for name, batched in cpu.items():
        if name.startswith("worker, ") and "batches of" in name:  # records before: none
            console.print(
                f"cpu: {name}: {batched['cpu_s_per_exchange'] * 1000:.2f} ms per exchange "
                f"({batched['rate']:.0f}/s; {batched['switches_each']:.0f} switches, "
                f"{batched['preemptions_each']:.0f} preemptions)"
            )
    if "exchange alone" in cpu:  # records before it was measured have none
        console.print(
            f"cpu: the exchange alone, one thread without Celery "
            f"{cpu['exchange alone']['cpu_s_per_exchange'] * 1000:.2f} ms per exchange"
        )
    for name, prof in (cpu.get("profiles") or {}).items():
        for kind in ("self", "ours"):
            if prof and prof.get(kind):
                top = ", ".join(f"{f} {share:.0%}" for f, share in prof[kind][:6])
                console.print(f"cpu profile, {name} ({prof['samples']} samples), {kind}: {top}")


def _print_replicas(console: Any, rep: dict[str, Any]) -> None:
    from rich.table import Table

    sizes = rep["sizes"]
    rt = Table(
        title=f"replicas: one Sentinel group (primary, 2 replicas, 3 Sentinels), no worker; "
        f"{sizes['rate']:g}/s for {sizes['seconds']:g} s, then {sizes['saturation_requests']} "
        f"at concurrency 100, mean of {sizes['rounds']} rounds"
    )
    for col in ("variant", "answers", "p50 ms", "p99 ms", "saturation /s", "saturation answers"):
        rt.add_column(col, justify="right")
    for name, r in rep.items():
        if isinstance(r, dict) and "saturation_per_s" in r:
            rt.add_row(
                name,
                str(r["open_loop_codes"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['saturation_per_s']:.0f}",
                str(r["saturation_codes"]),
            )
    console.print(rt)
    for pair in ("replicated / unreplicated", "sentinels / REDIS_URL"):
        ratios = rep[pair]
        console.print(
            f"{pair}: p50 {ratios['p50']:.2f}, p99 {ratios['p99']:.2f}, "
            f"saturation {ratios['saturation']:.2f}"
        )
    fo = rep["failover"]
    each = ", ".join("none" if t is None else f"{t:.2f}" for t in fo["first_202_s"])
    median = "n/a" if fo["median_s"] is None else f"{fo['median_s']:.2f}"
    worst = "n/a" if fo["max_s"] is None else f"{fo['max_s']:.2f}"
    console.print(
        f"failover (MIN_REPLICAS=1), SIGKILL to the first 202: {each} s; "
        f"median {median} s, max {worst} s"
    )


if __name__ == "__main__":
    main()
