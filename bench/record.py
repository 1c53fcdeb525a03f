"""One benchmark run as a dated record under bench/results/: the command that made it, the
machine, each headline figure beside its baseline, and the raw results. The docs' benchmark
page renders the newest record (docs/hooks/bench_table.py), so no figure is copied by hand."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def command(argv: list[str] | None) -> str:
    """The command line that reproduces this run."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", "bench", *args])


def machine() -> dict[str, Any]:
    """What the figures were measured on: they move with the cores and whatever else runs,
    so the load average is recorded too (here at the start, and by `write` at the end)."""
    return {
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m_start": _load(),
    }


def write(
    results: dict[str, Any],
    *,
    argv: list[str] | None,
    started: datetime.datetime,
    wall_s: float,
    machine_at_start: dict[str, Any] | None = None,
    path: Path | None = None,
) -> Path:
    """Write the run to `path`, by default bench/results/<UTC start>.json; return where."""
    if path is None:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{started.strftime('%Y-%m-%dT%H-%M-%SZ')}.json"
    record = {
        "started": started.isoformat(timespec="seconds"),
        "command": command(argv),
        "wall_s": round(wall_s, 1),
        "machine": {**(machine_at_start or machine()), "load_average_1m_end": _load()},
        "figures": figures(results),
        "results": results,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def newest(directory: Path = RESULTS_DIR) -> Path | None:
    """The newest record (names sort by their start time), or None when there is none."""
    records = sorted(directory.glob("*.json"))
    return records[-1] if records else None


def _row(rows: list[dict[str, Any]], scenario: str, figure: str, value: Any, unit: str) -> None:
    if value is None:
        return
    if isinstance(value, float):
        value = round(value, 3 if abs(value) < 10 else 1)
    rows.append({"scenario": scenario, "figure": figure, "value": value, "unit": unit})


def figures(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures of whichever scenarios ran, one row each."""
    rows: list[dict[str, Any]] = []
    for name, r in results.get("open_loop", {}).items():
        _row(rows, "open_loop", f"{name}: p50", r.get("p50_ms"), "ms")
        _row(rows, "open_loop", f"{name}: p99", r.get("p99_ms"), "ms")
        _row(rows, "open_loop", f"{name}: answers", r.get("codes"), "")
        stored = _pct(r.get("stored_share"))
        _row(rows, "open_loop", f"{name}: stored", stored, "%")
        for proc, mb in (r.get("peak_rss_mb") or {}).items():
            _row(rows, "open_loop", f"{name}: {proc} peak RSS", mb, "MB")
    sat = results.get("saturation")
    if sat:
        _row(rows, "saturation", "finishes", sat.get("accept_rate"), "/s")
        _row(rows, "saturation", "p99", sat.get("p99_ms"), "ms")
        _row(
            rows,
            "saturation",
            "bare send_task loop (baseline)",
            sat.get("bare_send_task_rate"),
            "/s",
        )
        _row(rows, "saturation", "ratio to the baseline", sat.get("ratio"), "×")
        _row(rows, "saturation", "web peak RSS", sat.get("web_peak_rss_mb"), "MB")
    dr = results.get("drain")
    if dr:
        for variant, r in dr.items():
            if isinstance(r, dict):
                _row(rows, "drain", f"{variant}: drained", r.get("rate"), "/s")
                cpu = r.get("cpu_s_per_exchange", r.get("cpu_s_per_task"))
                _row(rows, "drain", f"{variant}: worker CPU each", _ms(cpu), "ms")
            else:
                _row(rows, "drain", variant, r, "×")
    for mode, r in results.get("wait_mode", {}).items():
        _row(rows, "wait_mode", f"{mode}: finishes", r.get("rate"), "/s")
        _row(rows, "wait_mode", f"{mode}: p99", r.get("p99_ms"), "ms")
        _row(rows, "wait_mode", f"{mode}: answers", r.get("codes"), "")
    for run, r in results.get("repair", {}).items():
        _row(rows, "repair", f"{run}: users", r.get("users_per_s"), "/s")
        _row(rows, "repair", f"{run}: repaired", f"{r.get('repaired')}/{r.get('users')}", "")
        _row(rows, "repair", f"{run}: share of the limit", _pct(r.get("share_of_limit")), "%")
    wh = results.get("webhooks")
    if wh:
        rate = wh.get("delivery to a 0 ms receiver", {}).get("rate")
        _row(rows, "webhooks", "deliveries to a 0 ms receiver", rate, "/s")
        for latency, r in wh.items():
            if latency.endswith(" ms") and isinstance(r, dict):
                _row(
                    rows,
                    "webhooks",
                    f"{latency} drain: receiver fine vs off",
                    r.get("fine vs off"),
                    "×",
                )
                hanging = r.get("hanging vs off")
                _row(rows, "webhooks", f"{latency} drain: receiver hanging vs off", hanging, "×")
    for run, r in results.get("abuse", {}).items():
        _row(rows, "abuse", f"{run}: real users' p99 to stored", r.get("real_p99_ms"), "ms")
        _row(rows, "abuse", f"{run}: vs no junk", r.get("p99_vs_no_junk"), "×")
        _row(rows, "abuse", f"{run}: junk answers", r.get("junk_codes") or None, "")
        if "junk_codes" not in r:  # the crowd: what its own finishes were answered
            _row(rows, "abuse", f"{run}: answers", r.get("real_codes"), "")
    for variant, r in results.get("step", {}).items():
        per_second = ", ".join(f"{v:.0f}" for v in r.get("p99_ms_per_second", []))
        _row(rows, "step", f"{variant}: p99 of each second", per_second or None, "ms")
        _row(rows, "step", f"{variant}: answers", r.get("codes"), "")
        for proc, cores in r.get("cores", {}).items():
            _row(rows, "step", f"{variant}: {proc}'s cores over the burst", cores, "")
    knee = results.get("knee")
    if knee:
        for design, r in knee.items():
            if isinstance(r, dict):
                knee_rps = r.get("knee_rps")
                if knee_rps is None:
                    _row(rows, "knee", f"{design}: knee", "none (under 100/s)", "")
                else:
                    _row(rows, "knee", f"{design}: knee", knee_rps, "/s")
        bound = "≥ " if knee.get("ratio_is_lower_bound") else ""
        if knee.get("ratio") is not None:
            _row(rows, "knee", "ours / inline", f"{bound}{knee['ratio']:.1f}", "×")
    rep = results.get("replicas")
    if rep:
        _replicas_rows(rows, rep)
    tr = results.get("tracing")
    if tr:
        _tracing_rows(rows, tr)
    cpu = results.get("cpu")
    if cpu:
        _cpu_rows(rows, cpu)
    ret = results.get("retention")
    if ret:
        for what, size in ret.get("redis_bytes_per_session", {}).items():
            _row(rows, "retention", f"Redis per finished session, {what}", size, "bytes")
        for table, n in ret.get("rows_after_retention", {}).items():
            done = ret.get("rows_when_finished", {}).get(table)
            _row(rows, "retention", f"{table} rows, finished → after the job", f"{done} → {n}", "")
    for design, r in results.get("connect", {}).items():
        if not isinstance(r, dict):
            continue
        name = design.split(" (")[0]
        _row(rows, "connect", f"{name}: wait for the token, p50", r.get("wait_p50_s"), "s")
        _row(rows, "connect", f"{name}: p99", r.get("wait_p99_s"), "s")
        _row(rows, "connect", f"{name}: served of {r.get('users')}", r.get("served"), "")
        _row(rows, "connect", f"{name}: requests the people made", r.get("asks"), "")
        _row(rows, "connect", f"{name}: calls the provider got", r.get("provider_calls"), "")
        _row(rows, "connect", f"{name}: refused by the provider (429)", r.get("provider_429s"), "")
    for stack_name, r in results.get("accept_burst", {}).items():
        _row(rows, "accept_burst", f"{stack_name}: finishes", r.get("rate"), "/s")
        _row(rows, "accept_burst", f"{stack_name}: p99", r.get("p99_ms"), "ms")
    return rows


def _cpu_rows(rows: list[dict[str, Any]], cpu: dict[str, Any]) -> None:
    """The CPU scenario's figures (bench/cpu.py): each process's CPU per unit of work beside
    its floor, and the top of each profile."""
    for name, r in cpu.items():
        if not isinstance(r, dict) or name == "profiles":
            if not isinstance(r, dict):
                _row(rows, "cpu", name, r, "×")
            continue
        if "cpu_ms_per_request" in r:
            unit = "accepted finish" if name == "web" else "request"
            _row(rows, "cpu", f"{name}: CPU per {unit}", r["cpu_ms_per_request"], "ms")
            _row(rows, "cpu", f"{name}: answers", r.get("codes"), "")
        else:
            each = "task" if "cpu_s_per_task" in r else "exchange"
            seconds = r.get("cpu_s_per_exchange", r.get("cpu_s_per_task"))
            _row(rows, "cpu", f"{name}: CPU per {each}", _ms(seconds), "ms")
            if "rate" in r:  # the exchange alone is timed, not drained
                _row(rows, "cpu", f"{name}: drained", r["rate"], "/s")
            if "switches_each" in r:  # records before it was measured have none
                _row(rows, "cpu", f"{name}: system CPU per {each}", r["system_ms_each"], "ms")
                _row(
                    rows,
                    "cpu",
                    f"{name}: threads switched out per {each}",
                    r["switches_each"] + r["preemptions_each"],
                    "",
                )
    for name, prof in (cpu.get("profiles") or {}).items():
        for kind, what in (("self", "top self"), ("ours", "top of this project's functions")):
            if prof and prof.get(kind):
                top = ", ".join(f"{f} {share:.0%}" for f, share in prof[kind][:6])
                _row(rows, "cpu", f"profile, {name}: {what} ({prof['samples']} samples)", top, "")


def _variant_rows(
    rows: list[dict[str, Any]], section: str, data: dict[str, Any], pairs: tuple[str, ...]
) -> None:
    """A `web_pass` scenario's figures (bench/harness.summarise): each variant's open-loop
    latency and saturation (and what an OTLP receiver got, where there was one), then the
    ratios named in `pairs`."""
    at = f"at {(data.get('sizes') or {}).get('rate', 300):g}/s"
    for variant, r in data.items():
        if isinstance(r, dict) and "saturation_per_s" in r:
            _row(rows, section, f"{variant}: p50 {at}", r.get("p50_ms"), "ms")
            _row(rows, section, f"{variant}: p99 {at}", r.get("p99_ms"), "ms")
            _row(rows, section, f"{variant}: answers {at}", r.get("open_loop_codes"), "")
            _row(rows, section, f"{variant}: saturation", r.get("saturation_per_s"), "/s")
            received = r.get("received")
            if received:
                exports = f"{received['export_requests']:,} ({received['bytes'] / 1e6:.1f} MB)"
                _row(rows, section, f"{variant}: exports the receiver got", exports, "")
    for pair in pairs:
        for figure, ratio in (data.get(pair) or {}).items():
            _row(rows, section, f"{pair}: {figure}", ratio, "×")


def _replicas_rows(rows: list[dict[str, Any]], rep: dict[str, Any]) -> None:
    """The Redis HA scenario's figures (bench/replicas.py): each variant's open-loop latency
    and saturation, the ratios, and the failovers."""
    _variant_rows(rows, "replicas", rep, ("replicated / unreplicated", "sentinels / REDIS_URL"))
    fo = rep.get("failover")
    if fo:
        each = ", ".join("none" if t is None else f"{t:.2f}" for t in fo.get("first_202_s", []))
        _row(rows, "replicas", "failover, SIGKILL to the first 202: each run", each or None, "s")
        _row(rows, "replicas", "failover: median", fo.get("median_s"), "s")
        _row(rows, "replicas", "failover: max", fo.get("max_s"), "s")
        if fo.get("runs_without_a_202"):
            _row(
                rows,
                "replicas",
                f"failover: runs with no 202 within {fo.get('give_up_s')} s",
                fo["runs_without_a_202"],
                "",
            )


def _tracing_rows(rows: list[dict[str, Any]], tr: dict[str, Any]) -> None:
    """The tracing scenario's figures (bench/tracing.py): each variant's open-loop latency
    and saturation, what the receiver got, and the ratios."""
    _variant_rows(rows, "tracing", tr, ("on / off", "off / previous release"))


def _pct(share: float | None) -> float | None:
    return None if share is None else share * 100


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
