"""The service's processes, started from their Procfile command lines by the core's
supervisor (humanconnect/cli/procs.py), each logging to a file the failure messages quote."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from humanconnect.cli import procs
from humanconnect.cli.procs import ALONE, commands, free_port, http_ok, wait_ready


def run_python(
    script: str, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh Python with `args`, from `cwd` (in `env`, else this one's); it
    must exit 0, or the test fails with the end of its stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


class Process(procs.Process):
    """A service process logging to `log`: `Process(name, argv, env, cwd, log)`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        super().__init__(name, argv, env, cwd=cwd, log=log)


def start_web(
    env: dict[str, str], cwd: Path, log: Path, *, prefix: tuple[str, ...] = ()
) -> tuple[Process, str]:
    """The web on a free port; `prefix` goes before its command (`faketime -f +5s`)."""
    port = free_port()
    proc = Process("web", [*prefix, *commands(port, cwd / "var")["web"]], env, cwd, log)
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(http_ok(url + "/healthz"), [proc], 30):
        proc.stop()
        raise AssertionError(f"the web did not start:\n{proc.output()[-3000:]}")
    return proc, url


def start_worker(env: dict[str, str], cwd: Path, log: Path, *, concurrency: int = 16) -> Process:
    """A worker alone on its broker, once it logs that it is ready."""
    argv = [*commands(0, cwd / "var")["worker"], "--concurrency", str(concurrency), *ALONE]
    proc = Process("worker", argv, env, cwd, log)
    if not wait_ready(lambda: "ready." in proc.output(), [proc], 60):
        proc.stop()
        raise AssertionError(f"the worker did not get ready:\n{proc.output()[-3000:]}")
    return proc


@dataclass
class Deployment:
    """`web` and `worker` running as the Procfile starts them (see the `deploy` fixture)."""

    url: str
    env: dict[str, str]
    web: Process
    worker: Process
    db_url: str
    logs: list[Path]
