"""Tracing: what traces cost the web, and that they cost nothing while off, in one run.

Three variants of the web, each a fresh process on the same stack (Redis, the stand-in, no
worker: the queue just fills), each given a warm-up, an open loop (300 finishes/s for 10 s,
latency from each finish's scheduled time: p50, p99) and a saturation closed loop (5,000 at
concurrency 100: finishes accepted per second), as bench/replicas.py measures its variants:

- tracing off: no OTEL_ variable, this tree;
- tracing on: OTEL_EXPORTER_OTLP_ENDPOINT to a local receiver in a process of its own
  (bench/receiver.py, answering every export at once), everything else at the SDK's
  defaults: every finish sampled, batches of 512 every 5 s or sooner;
- the previous release with no OTEL_ variable: `git archive` of PREVIOUS (the commit before
  tracing) in a temporary directory, run from there with the same harness and command line.

The variants alternate over `rounds` rounds, in reverse order every other round, so the
machine's drift falls on each alike; a variant's figures are the mean of its rounds'. The
ratios: on / off (what tracing costs when on), off / previous (what its hooks cost when off).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    ROOT,
    Stack,
    alternating_rounds,
    ratios,
    stack,
    summarise,
    wait_http,
    web_pass,
)
from humanconnect.cli.procs import free_port
from humanconnect.sandbox.standin import Faults

#: The last commit before tracing: the previous release the `off` variant is compared with.
PREVIOUS = "5f4d227"
RATE = 300
SECONDS = 10
SATURATION_REQUESTS = 5000
ROUNDS = 2

OFF = "tracing off"
ON = "tracing on, OTLP to a local receiver"
BEFORE = f"previous release ({PREVIOUS}), no tracing"


def _previous_tree(into: Path) -> Path | None:
    """PREVIOUS's tree, unpacked into `into`; None where git or the commit is missing."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _imports_from(root: Path, env: dict[str, str]) -> bool:
    """Whether a process started as the web is, in `root`, imports the service from there."""
    probe = subprocess.run(
        [sys.executable, "-c", "import humanconnect, producer; print(humanconnect.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return probe.stdout.strip().startswith(str(root.resolve()))


def _measure(s: Stack, root: Path, env: dict[str, str], run: str) -> dict[str, Any]:
    """One variant's web (the Procfile's, run from `root` with `env` added): warm-up, open
    loop, saturation; then the web stopped."""
    url = s.start_web(cwd=root, env=env)
    try:
        return web_pass(s, url, run, rate=RATE, seconds=SECONDS, requests=SATURATION_REQUESTS)
    finally:
        s.stop("web")


def _sink(s: Stack) -> str:
    """The OTLP receiver: bench/receiver.py, answering every export 204 at once."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.receiver", "--port", str(port), "--mode", "ok"]
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/", s.spawn("otlp-receiver", argv))
    return url


def _received(url: str) -> dict[str, int]:
    requests, received = httpx.get(url + "/", timeout=10).text.split()
    return {"export_requests": int(requests), "bytes": int(received)}


def tracing_scenario(rounds: int = ROUNDS) -> dict[str, Any]:
    s = stack(Faults())
    previous_dir = Path(tempfile.mkdtemp(prefix="hc-bench-previous-"))
    try:
        sink = _sink(s)
        # The stack's own environment, with no tracing variable whatever the shell has.
        for name in [k for k in s.env if k.startswith("OTEL_")]:
            del s.env[name]
        variants: dict[str, tuple[Path, dict[str, str]]] = {
            OFF: (ROOT, {}),
            ON: (ROOT, {"OTEL_EXPORTER_OTLP_ENDPOINT": sink}),
        }
        previous = _previous_tree(previous_dir)
        if previous is not None:
            # Its own tree first on the path: the service is imported from there, not here.
            env = {"PYTHONPATH": str(previous)}
            if not _imports_from(previous, {**s.env, **env}):
                raise RuntimeError(f"the previous release in {previous} imports this tree")
            variants[BEFORE] = (previous, env)
        runs = alternating_rounds(
            list(variants), rounds, lambda name, run: _measure(s, *variants[name], f"t{run}")
        )
        out: dict[str, Any] = {name: summarise(measured) for name, measured in runs.items()}
        out[ON]["received"] = _received(sink)
        out["on / off"] = ratios(out[ON], out[OFF])
        if BEFORE in out:
            out["off / previous release"] = ratios(out[OFF], out[BEFORE])
        out["sizes"] = {
            "rate": RATE,
            "seconds": SECONDS,
            "saturation_requests": SATURATION_REQUESTS,
            "rounds": rounds,
        }
        return out
    finally:
        s.close()
        shutil.rmtree(previous_dir, ignore_errors=True)


def print_tracing(console: Any, tr: dict[str, Any]) -> None:
    """The scenario's table and ratios, for `make bench`'s output."""
    from rich.table import Table

    sizes = tr["sizes"]
    table = Table(
        title=f"tracing: the web alone, {sizes['rate']}/s for {sizes['seconds']} s, then "
        f"{sizes['saturation_requests']} at concurrency 100, mean of {sizes['rounds']} rounds"
    )
    for col in ("variant", "answers", "p50 ms", "p99 ms", "saturation /s"):
        table.add_column(col, justify="right")
    for name, r in tr.items():
        if isinstance(r, dict) and "saturation_per_s" in r:
            table.add_row(
                name,
                str(r["open_loop_codes"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['saturation_per_s']:.0f}",
            )
    console.print(table)
    for pair in ("on / off", "off / previous release"):
        if pair in tr:
            ratios = tr[pair]
            console.print(
                f"{pair}: p50 {ratios['p50']:.2f}, p99 {ratios['p99']:.2f}, "
                f"saturation {ratios['saturation']:.2f}"
            )
