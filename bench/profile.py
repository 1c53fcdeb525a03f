"""Where a process's CPU goes: py-spy sampling it from outside while a scenario runs, and the
top entries of what it saw. Without py-spy (`pip install py-spy`) the scenario runs unprofiled."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.harness import BIN

#: Samples a second: enough for a few thousand samples in a scenario's seconds.
RATE = 250
#: How many entries a summary keeps.
TOP = 12
_LINE = re.compile(r"^(.*) (\d+)$")
#: "name (path/to/module.py:123)": the line number dropped, the path cut to its package.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<path>[^:()]*)(?::\d+)?\)$")
_PACKAGE_ROOTS = ("site-packages/", "lib/python3.")
#: This project's packages: their functions make the `ours` list.
OURS = ("humanconnect/", "producer/", "worker/", "bench/")


def py_spy() -> str | None:
    """The py-spy executable beside this Python, else on PATH, else None."""
    local = BIN / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Profile:
    """`with Profile(pid, out):` samples `pid` (all its threads, idle ones left out) into
    `out`, py-spy's collapsed stacks; nothing happens when `out` is None or py-spy is not
    installed."""

    def __init__(self, pid: int, out: Path | None, rate: int = RATE):
        self.pid = pid
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profile:
        exe = py_spy()
        if exe is None or self.out is None:
            return self
        argv = [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate)]
        # Non-blocking: the process is never paused, so what it spends is what it would.
        # The thread holding the GIL only: with 32 threads waiting on the upstream, on the GIL
        # or on a pool, py-spy's own idle test counts most of them as busy (a thread waking
        # from I/O and waiting for the GIL looks busy), and the profile drowns in waiting.
        argv += ["--nonblocking", "--gil", "--format", "raw", "--output", str(self.out)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _frame(raw: str) -> str:
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip()
    path = match["path"]
    for root in _PACKAGE_ROOTS:
        if root in path:
            path = path.split(root, 1)[1]
            if root == "lib/python3.":
                path = path.split("/", 1)[-1]
            return f"{match['name']} ({path})"
    # This project's own modules, wherever the checkout is (py-spy shortens paths it finds on
    # sys.path: `celery/worker/...` is Celery's, `worker/...` ours).
    for package in OURS:
        if path.startswith(package):
            return f"{match['name']} ({path})"
        if path.startswith("/") and f"/{package}" in path:
            return f"{match['name']} ({package}{path.rsplit(f'/{package}', 1)[-1]})"
    return f"{match['name']} ({path})"


def _ours(frame: str) -> bool:
    return frame.endswith(")") and frame.rsplit(" (", 1)[-1].startswith(OURS)


def summary(path: Path, top: int = TOP) -> dict[str, Any] | None:
    """The samples' count and the `top` functions by share of samples: where the CPU was
    spent itself (`self`), under which calls (`inclusive`), and under which of this project's
    own functions (`ours`); None when there is no file."""
    if not path.exists():
        return None
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        count = int(match[2])
        frames = [_frame(f) for f in match[1].split(";") if f]
        # The thread's own frame (py-spy's first, "process NNN" with --subprocesses) is no call.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            under[f] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": [], "ours": []}

    def shares(counter: Counter[str]) -> list[list[Any]]:
        # A frame under nearly every sample is a thread's entry (the loop, the pool): no news.
        telling = ((name, n) for name, n in counter.most_common() if n < 0.95 * total)
        return [[name, round(n / total, 3)] for name, n in list(telling)[:top]]

    mine = Counter({f: n for f, n in under.items() if _ours(f)})
    return {
        "samples": total,
        "file": str(path),
        "self": shares(own),
        "inclusive": shares(under),
        "ours": shares(mine),
    }
