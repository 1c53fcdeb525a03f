"""`humanconnect up` on a machine with only Python: embedded Redis, sandbox, README's curl."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from humanconnect.cli.procs import commands, free_port
from humanconnect.cli.up import EXAMPLE_HUMAN_ID, EXAMPLE_SESSION_TOKEN
from humanconnect.settings import SANDBOX_CLIENT_ID
from tests.support.env import BIN, ROOT, service_env, wait_for

GUIDE_EXAMPLE = {
    "humanId": EXAMPLE_HUMAN_ID,
    "clientId": SANDBOX_CLIENT_ID,
    "sessionToken": EXAMPLE_SESSION_TOKEN,
}


def _up(cwd: Path, port: int, *more: str) -> subprocess.Popen[str]:
    # No REDIS_URL, no secret, no keys: what a newcomer has.
    return subprocess.Popen(
        [str(BIN / "humanconnect"), "up", "--port", str(port), *more],
        cwd=cwd,
        env=service_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return out


@pytest.mark.slow
def test_up_finishes_the_guide_example_and_a_second_up_reuses_var(tmp_path: Path) -> None:
    """The README's curl gets 202 and its status reaches succeeded; Ctrl-C stops everything.
    With --webhook-echo, the example receiver prints the completion it verified."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _up(tmp_path, port, "--webhook-echo")
    try:
        wait_for(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, 90, what="up")
        resp = httpx.post(url + "/connect/finish", json=GUIDE_EXAMPLE)
        assert resp.status_code == 202
        status_url = url + resp.headers["Location"]
        final = wait_for(
            lambda: (s := httpx.get(status_url).json())["status"] == "succeeded" and s,
            60,
            what="the guide's example to succeed",
        )
        assert len(final["publicToken"]) == 32
        # The sandbox app's page, whose URL `up` prints
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "Connect health data" in page.text
        # Idle past one tick of beat's 5 s outbox sweep: housekeeping that finds nothing
        # to do must not show up.
        time.sleep(6)
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "SANDBOX MODE" in out and "curl" in out
    assert f"Or open the sandbox app in a browser: {url}/" in out
    # The finish's own outcome line, and none of Celery's routine per-task/per-tick lines
    assert f"exchange succeeded request={final['requestId']}" in out
    # The echo receiver verified the signature and printed the event (a line of JSON).
    echoed = [line.split("| ", 1)[1] for line in out.splitlines() if line.startswith("webhook |")]
    completed = [json.loads(line) for line in echoed if line.startswith("{")]
    assert [(e["type"], e["data"]["requestId"]) for e in completed] == [
        ("connect.completed", final["requestId"])
    ], out[-3000:]
    assert "publicToken" not in json.dumps(completed)
    assert "Sending due task" not in out
    assert "] received" not in out and "] succeeded in" not in out
    assert (tmp_path / "var" / "redis").is_dir()
    # Nothing of ours is left running.
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""

    # A second `up` in the same folder still knows the finished session.
    proc = _up(tmp_path, port)
    try:
        wait_for(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, 90, what="up")
        again = httpx.get(status_url).json()
        assert again["status"] == "succeeded"
        assert again["publicToken"] == final["publicToken"]
        resp = httpx.post(url + "/connect/finish", json=GUIDE_EXAMPLE)
        assert resp.status_code == 202 and resp.json()["requestId"] == final["requestId"]
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out[-3000:]


def test_procfile_runs_the_commands_up_runs() -> None:
    """The Procfile and `humanconnect up` start the same three programs."""
    lines = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()
    )
    assert set(lines) == {"web", "worker", "beat"}
    ours = commands(8000, Path("var"))
    # `up` binds loopback; everything else is the same.
    local_only = {"--host"}

    def strip(argv: list[str]) -> list[str]:
        out, skip = [], False
        for arg in argv:
            if skip:
                skip = False
            elif arg in local_only:
                skip = True
            else:
                out.append(arg)
        return out

    for name, argv in ours.items():
        procfile = shlex.split(lines[name].replace("${PORT:-8000}", "8000"))
        ours_plain = [Path(a).name if a.startswith(str(BIN)) else a for a in argv]
        assert strip(ours_plain) == strip(procfile)


def test_up_refuses_a_missing_key_outside_sandbox(tmp_path: Path) -> None:
    """With a secret but no encryption keys, `up` stops with one line naming the variable."""
    env = service_env(HUMANAPI_CLIENT_SECRET="a" * 40, HUMANAPI_CLIENT_ID="b" * 40)
    proc = subprocess.run(
        [str(BIN / "humanconnect"), "up", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "HUMANCONNECT_ENCRYPTION_KEYS" in proc.stdout + proc.stderr
    assert "a" * 40 not in proc.stdout + proc.stderr
    assert os.path.isdir(tmp_path / "var")
