"""Start what a benchmark needs: Redis, the stand-in, and the service's own processes."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import create_engine, text

from humanconnect.cli.procs import (
    ALONE,
    Process,
    commands,
    free_port,
    http_ok,
    stop_all,
    wait_ready,
)
from humanconnect.cli.redis_server import RedisServer
from humanconnect.sandbox.standin import Faults, client_user_id_for, no_collection
from humanconnect.storage import migrate
from humanconnect.tickets import mint

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLIENT_ID = "2e9574ecd415c99346879d07689ec1c732c11036"
CLIENT_SECRET = "bench0000bench0000bench0000bench00000000"
FERNET_KEY = "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg="
TICKET_KEY = "bench-ticket-key-0123456789abcdef0123"
#: The service's app on the Procfile's `web` command line (a factory).
SERVICE_APP = "producer.main:app"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _cpu_times(pid: int) -> tuple[float, float]:
    """The user and system CPU a process has used so far, all its threads (/proc, seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime: the stat's 14th and 15th fields, the 12th and 13th after the name.
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_s(pid: int) -> float:
    """The CPU a process has used so far, user and system, all its threads (/proc, seconds)."""
    return sum(_cpu_times(pid))


@dataclass(frozen=True)
class CpuCounters:
    """A process's CPU so far, split into user and system time, and how often each of its
    threads was switched out (/proc): voluntarily (blocked: on I/O, on a lock, on the GIL)
    or not (preempted). A thread that ends between two readings takes its switches since
    the first with it; its CPU time stays in the process's."""

    user_s: float
    system_s: float
    #: Per thread id: (voluntary, involuntary) switches.
    switches: dict[int, tuple[int, int]]

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    @classmethod
    def of(cls, pid: int) -> CpuCounters:
        switches: dict[int, tuple[int, int]] = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                status = dict(
                    line.split(":", 1) for line in (task / "status").read_text().splitlines()
                )
            except OSError:
                continue  # the thread ended meanwhile
            switches[int(task.name)] = (
                int(status["voluntary_ctxt_switches"]),
                int(status["nonvoluntary_ctxt_switches"]),
            )
        return cls(*_cpu_times(pid), switches)

    def per(self, before: CpuCounters, units: int) -> dict[str, float]:
        """What was spent since `before`, per unit of work: each thread's switches counted
        from its own earlier reading (from nothing, for a thread started since)."""
        voluntary = involuntary = 0
        for tid, (v, i) in self.switches.items():
            v0, i0 = before.switches.get(tid, (0, 0))
            voluntary += v - v0
            involuntary += i - i0
        return {
            "user_ms_each": (self.user_s - before.user_s) * 1000 / units,
            "system_ms_each": (self.system_s - before.system_s) * 1000 / units,
            "switches_each": voluntary / units,
            "preemptions_each": involuntary / units,
        }


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, from /proc (MB)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class StandInProcess:
    """The upstream stand-in in a process of its own (the load generator holds this one's GIL)."""

    def __init__(self, workdir: Path, faults: Faults):
        self.port = free_port()
        self.workdir = workdir
        self.faults = faults
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StandInProcess:
        f = self.faults
        argv = [
            *(sys.executable, "-m", "humanconnect.sandbox.standin", "--port", str(self.port)),
            *("--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET),
            *("--latency-ms", str(f.latency_ms), "--p503", str(f.p503), "--p429", str(f.p429)),
            *("--pdrop", str(f.pdrop), "--retry-after-s", str(f.retry_after_s), "--seed", "1"),
            *("--rate-limit-rps", str(f.rate_limit_rps)),
        ]
        self.process = Process("standin", argv, log=self.workdir / "standin.log")
        wait_http(self.url + "/_standin/stats", self.process)
        return self

    def stats(self) -> dict[str, Any]:
        import httpx

        return dict(httpx.get(self.url + "/_standin/stats", timeout=10).json())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(10)


@dataclass
class Stack:
    """One benchmark deployment; `close()` stops everything it started."""

    workdir: Path
    #: The stack's own Redis; None when `stack(redis_env=...)` points it at another.
    redis: RedisServer | None
    standin: StandInProcess
    env: dict[str, str]
    procs: dict[str, Process] = field(default_factory=dict)
    peak_rss: dict[str, float] = field(default_factory=dict)
    web_url: str = ""

    @property
    def redis_url(self) -> str:
        if self.redis is None:
            raise RuntimeError("this stack has no Redis of its own (see its REDIS_ variables)")
        return self.redis.url

    def sample_rss(self) -> None:
        for name, proc in self.procs.items():
            self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), rss_mb(proc.pid))

    def start_web(
        self,
        *extra: str,
        app: str = SERVICE_APP,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
    ) -> str:
        """The Procfile's `web` command (or another ASGI app on the same command line, for
        the inline baseline), run from `cwd` with `env` added to the stack's; options given
        again in `extra` override it."""
        port = free_port()
        argv = commands(port, self.workdir)["web"]
        if app != SERVICE_APP:
            # Another module's ready-made app, not the service's factory.
            argv[argv.index(SERVICE_APP)] = app
            argv.remove("--factory")
        web = self.spawn("web", [*argv, "--log-level", "warning", *extra], cwd=cwd, env=env)
        self.web_url = f"http://127.0.0.1:{port}"
        # The service answers /readyz once its start (the warm-up too) is done.
        ready = "/readyz" if app == SERVICE_APP else "/openapi.json"
        wait_http(self.web_url + ready, web)
        return self.web_url

    def start_worker(self, concurrency: int = 32) -> None:
        argv = [*commands(0, self.workdir)["worker"], "-l", "WARNING"]
        self.spawn("worker", [*argv, "--concurrency", str(concurrency), *ALONE])

    def start_beat(self) -> None:
        self.spawn("beat", [*commands(0, self.workdir)["beat"], "-l", "WARNING"])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop(30)

    def spawn(
        self,
        name: str,
        argv: list[str],
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
    ) -> Process:
        """`argv` as process `name` of this stack (stopped by `close()`), in its environment
        with `env` added, from `cwd`, logging to <workdir>/<name>.log."""
        merged = {**self.env, **env} if env else self.env
        proc = Process(name, argv, merged, cwd=cwd, log=self.workdir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def close(self) -> None:
        stop_all(list(self.procs.values()))
        self.procs.clear()
        self.standin.stop()
        if self.redis is not None:
            self.redis.stop()


def wait_http(url: str, proc: Process | None = None, timeout: float = 30) -> None:
    """Until `url` answers 200; fails at once if `proc` (what serves it) exits."""
    if not wait_ready(http_ok(url), [proc] if proc else [], timeout, interval=0.1):
        tail = proc.output()[-2000:] if proc else ""
        raise RuntimeError(f"{url} did not come up\n{tail}")


def count(db_url: str, sql: str) -> int:
    """One `SELECT count(*) …` against the benchmark's database."""
    engine = create_engine(db_url)
    with engine.connect() as c:
        n = c.execute(text(sql)).scalar_one()
    engine.dispose()
    return int(n)


def stack(
    faults: Faults, *, max_rps: float = 100000, redis_env: dict[str, str] | None = None
) -> Stack:
    """Redis + stand-in + migrated SQLite; the caller starts web/worker as it needs.
    `redis_env` (e.g. REDIS_SENTINELS and REDIS_SENTINEL_MASTER) says where a Redis the
    caller runs is, in place of REDIS_URL and a Redis of the stack's own."""
    workdir = Path(tempfile.mkdtemp(prefix="hc-bench-"))
    redis_server = RedisServer(workdir).start() if redis_env is None else None
    standin = StandInProcess(workdir, faults).start()
    db_url = f"sqlite:///{workdir / 'bench.db'}"
    migrate.upgrade(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUMANAPI_", "HUMANCONNECT_"))}
    env.pop("REDIS_URL", None)
    env.update({"REDIS_URL": redis_server.url} if redis_server else (redis_env or {}))
    env.update(
        DATABASE_URL=db_url,
        HUMANAPI_BASE_URL=standin.url,
        HUMANAPI_AUTH_URL=standin.url,
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANAPI_CLIENT_SECRET=CLIENT_SECRET,
        HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY,
        HUMANAPI_MAX_RPS=str(max_rps),
        HUMANCONNECT_AUTO_MIGRATE="0",
        # Tickets on: every finish is checked (the ticket check is CPU only, no Redis call).
        HUMANCONNECT_TICKET_KEY=TICKET_KEY,
        # The per-source limits on, counted for every finish, but above what one load
        # generator on one address sends: the bench measures their cost, not their refusals.
        HUMANCONNECT_FINISH_LIMIT_PER_IP="1000000/second",
        HUMANCONNECT_FINISH_LIMIT_PER_USER="1000000/second",
        PYTHONUNBUFFERED="1",
    )
    return Stack(workdir, redis_server, standin, env)


def idle_then_burst(
    app: str,
    *,
    worker: bool,
    max_rps: float,
    idle_s: float,
    bodies: list[dict[str, str]],
    rate: float,
) -> dict[str, Any]:
    """A fresh stack (upstream at 200 ms) running `app`, with a worker and beat beside it if
    asked, left idle `idle_s`, then `bodies` sent open loop at `rate`: the step and knee
    scenarios' one measurement."""
    s = stack(Faults(latency_ms=200), max_rps=max_rps)
    try:
        if worker:
            # Beat too, as every deployment runs it: its sweeps share the cores.
            s.start_worker()
            s.start_beat()
        url = s.start_web(app=app)
        time.sleep(idle_s)
        pids = {name: p.pid for name, p in s.procs.items() if name in ("web", "worker", "beat")}
        cpu0, t0 = {n: cpu_s(pid) for n, pid in pids.items()}, time.perf_counter()
        result = asyncio.run(open_loop(url, bodies, rate))
        wall = time.perf_counter() - t0
        # Cores each process used over the burst: what it took from the other on 2 cores.
        result["cores"] = {n: (cpu_s(pid) - cpu0[n]) / wall for n, pid in pids.items()}
        return result
    finally:
        s.close()


def ticket_headers(bodies: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each finish's Authorization header: a ticket for the user the stand-in will name,
    minted before the clock starts (an app's server mints it before Connect opens)."""
    return [
        {"Authorization": f"Bearer {mint(TICKET_KEY, client_user_id_for(b['humanId']), 3600)}"}
        for b in bodies
    ]


def body(i: int, run: str) -> dict[str, str]:
    """A distinct, valid session for user `i` of run `run`."""
    seed = f"{run}{i:08x}"
    return {
        "humanId": (seed * 4)[:24],
        "clientId": CLIENT_ID,
        "sessionToken": (seed[::-1] * 4)[:32],
    }


async def closed_loop(
    url: str,
    bodies: list[dict[str, str]],
    concurrency: int,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Send every body with at most `concurrency` in flight; per-request latency in ms."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    conn = aiohttp.TCPConnector(limit=concurrency)
    tickets = dict(zip((b["sessionToken"] for b in bodies), ticket_headers(bodies), strict=True))
    async with aiohttp.ClientSession(base_url=url, connector=conn) as session:

        async def runner() -> None:
            while not queue.empty():
                b = queue.get_nowait()
                sent = {**tickets[b["sessionToken"]], **(headers or {})}
                t0 = time.perf_counter()
                async with session.post("/connect/finish", json=b, headers=sent) as resp:
                    await resp.read()
                    codes[resp.status] = codes.get(resp.status, 0) + 1
                latencies.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(runner() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(bodies),
        "seconds": elapsed,
        "rate": len(bodies) / elapsed,
        "accepted": codes.get(202, 0) + codes.get(201, 0),
        "accept_rate": (codes.get(202, 0) + codes.get(201, 0)) / len(bodies),
        "codes": codes,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
    }


async def open_loop(
    url: str, bodies: list[dict[str, str]], rate: float, timeout_s: float = 30.0
) -> dict[str, Any]:
    """Send body i at start + i/rate whatever the previous answers do (no coordinated
    omission): latency counts from the scheduled time, so a slow server can't hide it."""
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    tickets = ticket_headers(bodies)
    # No collection while it sends: a full collection of the load generator's heap
    # (thousands of pending sends) took 29–59 ms here, and every finish due meanwhile would
    # count that pause as the server's latency.
    with no_collection():
        return await _open_loop(url, bodies, rate, conn, timeout, tickets)


async def _open_loop(
    url: str,
    bodies: list[dict[str, str]],
    rate: float,
    conn: aiohttp.TCPConnector,
    timeout: aiohttp.ClientTimeout,
    tickets: list[dict[str, str]],
) -> dict[str, Any]:
    latencies: list[float] = []
    #: Each second of the run's latencies, by when the finish was due.
    seconds: dict[int, list[float]] = {}
    codes: dict[int, int] = {}
    async with aiohttp.ClientSession(base_url=url, connector=conn, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.5

        async def one(i: int, b: dict[str, str]) -> None:
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                async with session.post("/connect/finish", json=b, headers=tickets[i]) as resp:
                    await resp.read()
                    codes[resp.status] = codes.get(resp.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                codes[0] = codes.get(0, 0) + 1
            latencies.append((loop.time() - due) * 1000)
            seconds.setdefault(int(i / rate), []).append(latencies[-1])

        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    return {
        "requests": len(bodies),
        "offered_rate": rate,
        "codes": codes,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "p99_ms_per_second": [round(percentile(seconds[k], 99), 1) for k in sorted(seconds)],
    }


def web_pass(
    s: Stack, url: str, run: str, *, rate: float, seconds: float, requests: int
) -> dict[str, Any]:
    """One started web's figures: a warm-up of 200, an open loop at `rate` for `seconds`,
    then a saturation closed loop of `requests` at concurrency 100 (the replicas and tracing
    scenarios' pass)."""
    asyncio.run(closed_loop(url, [body(i, run + "w") for i in range(200)], 100))
    users = int(rate * seconds)
    ol = asyncio.run(open_loop(url, [body(i, run + "o") for i in range(users)], rate))
    sat = asyncio.run(closed_loop(url, [body(i, run + "s") for i in range(requests)], 100))
    s.sample_rss()
    return {
        "open_loop": {k: ol[k] for k in ("codes", "p50_ms", "p99_ms", "max_ms")},
        "saturation": {
            "requests": sat["requests"],
            "seconds": sat["seconds"],
            "codes": sat["codes"],
            "accepted_per_s": sat["codes"].get(202, 0) / sat["seconds"],
            "p99_ms": sat["p99_ms"],
        },
    }


def summed_codes(rounds: list[dict[str, Any]], part: str) -> dict[int, int]:
    """Answers by status code over every round's `part` (a `web_pass` result's)."""
    total: dict[int, int] = {}
    for r in rounds:
        for code, n in r[part]["codes"].items():
            total[code] = total.get(code, 0) + n
    return dict(sorted(total.items()))


def alternating_rounds(
    variants: list[str], rounds: int, measure: Callable[[str, str], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """`measure(variant, run)` for each variant, `rounds` times, the order reversed every
    other round so that no variant always runs first (a machine's drift falls on all)."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for n in range(rounds):
        for m, variant in enumerate(variants if n % 2 == 0 else variants[::-1]):
            runs[variant].append(measure(variant, f"{n}{m}"))
    return runs


def summarise(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's `web_pass` rounds: the means, the answers summed, and the rounds."""
    return {
        "p50_ms": statistics.fmean(r["open_loop"]["p50_ms"] for r in measured),
        "p99_ms": statistics.fmean(r["open_loop"]["p99_ms"] for r in measured),
        "open_loop_codes": summed_codes(measured, "open_loop"),
        "saturation_per_s": statistics.fmean(r["saturation"]["accepted_per_s"] for r in measured),
        "saturation_codes": summed_codes(measured, "saturation"),
        "rounds": measured,
    }


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Variant `a`'s summary over `b`'s."""
    return {
        "p50": a["p50_ms"] / b["p50_ms"],
        "p99": a["p99_ms"] / b["p99_ms"],
        "saturation": a["saturation_per_s"] / b["saturation_per_s"],
    }
