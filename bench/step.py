"""Step: an idle service, then 800 finishes/s for 10 s (an onboarding push arriving on an
idle service). The p99 of each second, for the web alone, the web with a worker beside it at
the default upstream limit (HUMANAPI_MAX_RPS=20) and unthrottled, and the guide's inline
design on the same upstream, same run. Issue 15's targets: every second's p99 ≤ 25 ms for
the web alone, ≤ 50 ms with the worker at the default limit, ours ≥ 5× lower than inline."""

from __future__ import annotations

from typing import Any

from bench.harness import body, idle_then_burst

RATE = 800
SECONDS = 10
#: How long the service idles between start and the step.
IDLE_S = 5.0
VARIANTS: dict[str, dict[str, Any]] = {
    "web alone": {"worker": False, "max_rps": 20},
    "web + worker, HUMANAPI_MAX_RPS=20": {"worker": True, "max_rps": 20},
    "web + worker, unthrottled": {"worker": True, "max_rps": 100000},
    "inline exchange (the guide's design)": {"worker": False, "max_rps": 20, "inline": True},
}


def step_scenario() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, (name, v) in enumerate(VARIANTS.items()):
        result = idle_then_burst(
            "bench.sync_baseline:app" if v.get("inline") else "producer.main:app",
            worker=v["worker"],
            max_rps=v["max_rps"],
            idle_s=IDLE_S,
            bodies=[body(i, f"st{n}") for i in range(RATE * SECONDS)],
            rate=RATE,
        )
        out[name] = {k: result[k] for k in ("codes", "p99_ms", "p99_ms_per_second")}
    return out
