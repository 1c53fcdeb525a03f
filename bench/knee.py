"""Knee: the highest offered rate, searched in steps of 100 finishes/s, whose p99 stays
≤ 50 ms, for the service (the web with a worker beside it at the default upstream limit,
HUMANAPI_MAX_RPS=20, as a user runs it) and for the guide's inline design
(bench/sync_baseline.py), both on an upstream stand-in answering in 200 ms.

Each rate is an open loop of 5 s (latency counted from each finish's scheduled time) on a
fresh stack: started, idle 2 s (the web is warm once /readyz answers, by design), then the
step, with sessions of their own. A rate passes when its p99 is ≤ 50 ms and every answer is
202 (ours) or 201 (inline). The search stops at the first failing rate, so the knee is the
highest rate at which it and every lower rate passed; it also stops at 3,000/s (reported as
`ceiling_reached`). None passing gives a knee of None (below 100/s): each tried rate's p99 is
kept. The inline design answers after the upstream's 200 ms, so its knee is expected to be None.

Why a fresh stack per rate, not one reused with its backlog left in place: with the worker
at 20/s almost nothing drains, so the search's backlog would add up (5 s at 100/s, 200/s, …
is 105,000 by 2,000/s) and hit the default cap (HUMANCONNECT_MAX_BACKLOG=100,000), whose
503s would be the search's, not the rate's. Each rate alone queues at most 15,000. A fresh
stack costs about 3 s, and each rate then starts from the same state, as in step.py.

`ratio` is ours over the inline knee, with a knee of None counted as the first step (100/s):
then the ratio is a lower bound (`ratio_is_lower_bound`). The load generator shares the
machine, so on a small one the knee is the machine's as much as the service's."""

from __future__ import annotations

from typing import Any

from bench.harness import SERVICE_APP, body, idle_then_burst

STEP = 100
CEILING = 3000
SECONDS = 5
#: How long the service idles between start and the step.
IDLE_S = 2.0
P99_MS = 50.0
DESIGNS: dict[str, dict[str, Any]] = {
    "humanconnect": {"app": SERVICE_APP, "worker": True, "accepted": 202},
    "inline exchange (the guide's design)": {
        "app": "bench.sync_baseline:app",
        "worker": False,
        "accepted": 201,
    },
}


def _one_rate(n: int, design: dict[str, Any], rate: int) -> dict[str, Any]:
    bodies = [body(i, f"k{n}r{rate}") for i in range(rate * SECONDS)]
    result = idle_then_burst(
        design["app"], worker=design["worker"], max_rps=20, idle_s=IDLE_S, bodies=bodies, rate=rate
    )
    codes: dict[int, int] = result["codes"]
    passed = result["p99_ms"] <= P99_MS and codes == {design["accepted"]: len(bodies)}
    return {
        "rate": rate,
        "p99_ms": result["p99_ms"],
        "p50_ms": result["p50_ms"],
        "codes": codes,
        "p99_ms_per_second": result["p99_ms_per_second"],
        "passed": passed,
    }


def knee_scenario() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, (name, design) in enumerate(DESIGNS.items()):
        tried: list[dict[str, Any]] = []
        knee: int | None = None
        for rate in range(STEP, CEILING + 1, STEP):
            tried.append(_one_rate(n, design, rate))
            if not tried[-1]["passed"]:
                break
            knee = rate
        out[name] = {
            "knee_rps": knee,
            "ceiling_reached": knee == CEILING,
            "tried": tried,
        }
    ours = out["humanconnect"]["knee_rps"] or 0
    base = out["inline exchange (the guide's design)"]["knee_rps"]
    out["ratio"] = ours / (base or STEP)
    out["ratio_is_lower_bound"] = base is None or out["humanconnect"]["ceiling_reached"]
    return out
