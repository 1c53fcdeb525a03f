"""The service's processes, started from their Procfile command lines."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from humanconnect.cli.procs import commands
from tests.support.env import free_port, wait_for


class Process:
    """A service process started from its Procfile command line, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name = name
        self.log_path = log
        self._log = open(log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_web(
    env: dict[str, str], cwd: Path, log: Path, *, prefix: tuple[str, ...] = ()
) -> tuple[Process, str]:
    """The web on a free port; `prefix` goes before its command (`faketime -f +5s`)."""
    port = free_port()
    proc = Process("web", [*prefix, *commands(port, cwd / "var")["web"]], env, cwd, log)
    url = f"http://127.0.0.1:{port}"
    import httpx

    wait_for(
        lambda: proc.alive() and httpx.get(url + "/healthz", timeout=1).status_code == 200,
        30,
        what="web to start",
    )
    return proc, url


def start_worker(env: dict[str, str], cwd: Path, log: Path, *, concurrency: int = 16) -> Process:
    proc = Process(
        "worker",
        [
            *commands(0, cwd / "var")["worker"],
            "--concurrency",
            str(concurrency),
            # Alone on the broker: skip the cluster chatter that only slows start-up.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env,
        cwd,
        log,
    )
    wait_for(lambda: not proc.alive() or "ready." in proc.output(), 60, what="worker to be ready")
    assert proc.alive(), proc.output()[-3000:]
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
