"""The deployment's processes: the Procfile's commands, and children that `up` supervises."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent


def commands(port: int, var: Path) -> dict[str, list[str]]:
    """The Procfile's three commands (tests check they stay the same)."""
    return {
        "web": [
            str(BIN / "uvicorn"),
            "producer.main:app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            # X-Forwarded-For counts only from HUMANCONNECT_TRUSTED_PROXIES (producer/app.py),
            # never from uvicorn's default of trusting whatever 127.0.0.1 says.
            "--no-proxy-headers",
        ],
        # Below the web in CPU priority: on a shared machine, accepting stays fast while the
        # queue absorbs the drain (worker/priority.py makes it hold under autogroup).
        "worker": [
            *("nice", "-n", "10", str(BIN / "celery"), "-A", "worker.celery:app"),
            *("worker", "-l", "INFO"),
        ],
        # The schedule lives in Redis (RedBeat), not in a file: any number of beats may run.
        "beat": [str(BIN / "celery"), "-A", "worker.celery:app", "beat", "-l", "INFO"],
    }


class Child:
    """A supervised child whose output is relayed line by line with its name in front."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], out: IO[str]):
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            bufsize=1,
        )
        self._relay = threading.Thread(target=self._pump, args=(out,), daemon=True)
        self._relay.start()

    def _pump(self, out: IO[str]) -> None:
        for line in self.proc.stdout or ():
            out.write(f"{self.name:>7} | {line}")
            out.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._relay.join(2)


def stop_all(children: list[Child], timeout: float = 30.0) -> None:
    """SIGTERM everyone (workers finish or re-queue what they hold), then wait."""
    for child in reversed(children):
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in reversed(children):
        child.wait(max(0.1, deadline - time.monotonic()))
