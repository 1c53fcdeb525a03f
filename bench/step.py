"""Step: an idle service, then a push of finishes for 10 s (an onboarding push arriving on
an idle service). The p99 of each second, and the cores web, worker and beat used over it,
for the web alone, the web with a worker (and beat) beside it at the default upstream limit
(HUMANAPI_MAX_RPS=20) and unthrottled, and the guide's inline design on the same upstream,
same run. Targets, at 800/s: every second's p99 ≤ 25 ms for the web alone, ≤ 50 ms with the
worker at the default limit, ours ≥ 5× lower than inline; at 300/s with the worker
unthrottled (draining as fast as it can on the same cores): ≤ 25 ms.
"""

from __future__ import annotations

from typing import Any

from bench.harness import SERVICE_APP, body, idle_then_burst

RATE = 800
SECONDS = 10
#: How long the service idles between start and the step.
IDLE_S = 5.0
#: The second rate with an unthrottled worker: a burst the web must still answer at once
#: while the worker drains as fast as it can beside it.
UNTHROTTLED_RATE = 300
VARIANTS: dict[str, dict[str, Any]] = {
    "web alone": {"worker": False, "max_rps": 20},
    "web + worker, HUMANAPI_MAX_RPS=20": {"worker": True, "max_rps": 20},
    "web + worker, unthrottled": {"worker": True, "max_rps": 100000},
    f"web + worker, unthrottled, {UNTHROTTLED_RATE}/s": {
        "worker": True,
        "max_rps": 100000,
        "rate": UNTHROTTLED_RATE,
    },
    "inline exchange (the guide's design)": {"worker": False, "max_rps": 20, "inline": True},
}


def step_scenario() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, (name, v) in enumerate(VARIANTS.items()):
        rate = v.get("rate", RATE)
        result = idle_then_burst(
            "bench.sync_baseline:app" if v.get("inline") else SERVICE_APP,
            worker=v["worker"],
            max_rps=v["max_rps"],
            idle_s=IDLE_S,
            bodies=[body(i, f"st{n}") for i in range(rate * SECONDS)],
            rate=rate,
        )
        out[name] = {k: result[k] for k in ("codes", "p99_ms", "p99_ms_per_second", "cores")}
        out[name]["rate"] = rate
    return out
