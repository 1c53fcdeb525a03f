"""The deployment's processes: the Procfile's commands, and the one supervisor that starts,
watches and stops them, for `humanconnect up`, the tests and the bench alike."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

BIN = Path(sys.executable).parent
#: Options for a worker alone on its broker (the tests', the bench's): no cluster chatter,
#: which only slows its start.
ALONE = ("--without-gossip", "--without-mingle", "--without-heartbeat")


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


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child in a session of its own, so a signal reaches whatever it starts (`nice`'s
    celery and its pool). Its output goes to `log` (a file, appended; `output()` reads it
    back), or to `out` line by line with its name in front (`up`), or nowhere."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        log: Path | None = None,
        out: IO[str] | None = None,
    ):
        self.name = name
        self.log_path = log
        self._log = open(log, "ab") if log is not None else None  # closed in stop()
        self._relay: threading.Thread | None = None
        stdout: Any = self._log or (subprocess.PIPE if out is not None else subprocess.DEVNULL)
        self.proc: subprocess.Popen[Any] = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Lines as they come, for the relay.
            text=out is not None and log is None,
            bufsize=1 if out is not None and log is None else -1,
        )
        if out is not None and log is None:
            self._relay = threading.Thread(target=self._pump, args=(out,), daemon=True)
            self._relay.start()

    def _pump(self, out: IO[str]) -> None:
        for line in self.proc.stdout or ():
            out.write(f"{self.name:>7} | {line}")
            out.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's whole session, if it still runs."""
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def terminate(self) -> None:
        """SIGTERM: a worker finishes or re-queues what it holds, then exits."""
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone: a crash, nothing finished."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL past `timeout`; its log closed and its relay drained."""
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if self._relay is not None:
            self._relay.join(2)
        if self._log is not None:
            self._log.close()

    def output(self) -> str:
        """What it wrote to its log so far ("" without one), for a failure's message."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def stop_all(procs: Sequence[Process], timeout: float = 30.0) -> None:
    """SIGTERM everyone, last started first (workers finish or re-queue what they hold),
    then wait for all within one `timeout`, SIGKILLing whoever outlasts it."""
    for proc in reversed(procs):
        proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in reversed(procs):
        proc.stop(max(0.1, deadline - time.monotonic()))


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: `url` answers 200 (a refused connection is not ready yet)."""

    def check() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def wait_ready(
    ready: Callable[[], Any],
    watch: Sequence[Process],
    timeout: float,
    *,
    stopping: Callable[[], bool] = lambda: False,
    interval: float = 0.05,
) -> bool:
    """Poll `ready` until it answers something truthy: True. False as soon as one of `watch`
    has exited, `stopping()` says so, or `timeout` passes (the caller says what failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if any(not p.alive() for p in watch):
            return False
        try:
            if ready():
                return True
        except Exception:  # whatever it reads may not be there yet
            pass
        time.sleep(interval)
    return False
