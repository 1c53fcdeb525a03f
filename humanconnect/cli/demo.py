"""`humanconnect demo --users N`: simulated onboardings against a running sandbox deployment."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from humanconnect.states import RequestState

FINAL = (RequestState.SUCCEEDED, RequestState.FAILED)


@dataclass
class Onboarding:
    body: dict[str, str]
    started: float = 0.0
    accepted: bool = False
    status_url: str = ""
    state: str = ""
    finished: float | None = None
    seen: set[str] = field(default_factory=set)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def _run(
    url: str, users: int, client_id: str, concurrency: int, timeout_s: float, console: Console
) -> list[Onboarding]:
    onboardings = [
        Onboarding(
            {
                "humanId": secrets.token_hex(12),
                "clientId": client_id,
                "sessionToken": secrets.token_hex(16),
            }
        )
        for _ in range(users)
    ]
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        with Progress(*columns, console=console) as progress:
            sent = progress.add_task("accepted", total=users)
            done = progress.add_task("finished", total=users)

            async def post(o: Onboarding) -> None:
                async with sem:
                    o.started = time.monotonic()
                    try:
                        resp = await client.post("/connect/finish", json=o.body)
                    except httpx.HTTPError:
                        o.state = "refused"
                        progress.advance(done)
                        return
                    if resp.status_code == 202:
                        o.accepted, o.status_url = True, resp.headers["Location"]
                    else:
                        o.state = f"refused {resp.status_code}"
                        progress.advance(done)
                    progress.advance(sent)

            async def follow(o: Onboarding) -> None:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    async with sem:
                        try:
                            state = (await client.get(o.status_url)).json().get("status", "")
                        except (httpx.HTTPError, ValueError):
                            state = ""
                    if state:
                        o.seen.add(state)
                    if state in FINAL:
                        o.state, o.finished = state, time.monotonic()
                        progress.advance(done)
                        return
                    await asyncio.sleep(0.1)
                o.state = "timed out"
                progress.advance(done)

            await asyncio.gather(*(post(o) for o in onboardings))
            await asyncio.gather(*(follow(o) for o in onboardings if o.accepted))
    return onboardings


def demo(
    url: str, users: int, client_id: str, *, concurrency: int = 50, timeout_s: float = 600.0
) -> int:
    """Fire `users` onboardings, follow each to its end, print a summary. 0 if all succeeded."""
    console = Console()
    started = time.monotonic()
    results = asyncio.run(_run(url, users, client_id, concurrency, timeout_s, console))
    elapsed = time.monotonic() - started
    accepted = [o for o in results if o.accepted]
    latencies = [
        o.finished - o.started for o in results if o.finished and o.state == RequestState.SUCCEEDED
    ]
    table = Table(title=f"humanconnect demo: {users} onboardings in {elapsed:.1f}s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("accept rate", f"{len(accepted) / max(users, 1):.1%}")
    table.add_row("succeeded", str(sum(o.state == RequestState.SUCCEEDED for o in results)))
    table.add_row("completion p50", f"{percentile(latencies, 50) * 1000:.0f} ms")
    table.add_row("completion p99", f"{percentile(latencies, 99) * 1000:.0f} ms")
    table.add_row("seen retrying", str(sum(RequestState.RETRYING in o.seen for o in results)))
    table.add_row("failed", str(sum(o.state == RequestState.FAILED for o in results)))
    table.add_row("refused or timed out", str(sum(o.state not in FINAL for o in results)))
    console.print(table)
    if latencies:
        console.print(f"mean completion {statistics.fmean(latencies) * 1000:.0f} ms")
    return 0 if all(o.state == RequestState.SUCCEEDED for o in results) else 1
