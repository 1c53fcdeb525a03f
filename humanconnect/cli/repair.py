"""`humanconnect repair`: the publicToken repair in the foreground, with a progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from humanconnect import redis_clients
from humanconnect.jobs.repair import Repairer, count_due
from humanconnect.jobs.repair import retry_failed as make_failed_eligible
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings
from humanconnect.upstream.limiter import GlobalRateLimiter


def repair(settings: Settings, *, limit: int | None, dry_run: bool, retry_failed: bool) -> int:
    settings.require(secret=not dry_run)
    rt = Runtime(settings)
    console = Console()
    if retry_failed:
        console.print(f"{make_failed_eligible(rt)} users made eligible again")
    with rt.db() as db:
        due = count_due(db)
    total = min(due, limit) if limit else due
    limiter = GlobalRateLimiter(redis_clients.client(settings), settings.max_rps)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("dry run" if dry_run else "repairing", total=total)
        report = Repairer(rt, limiter.acquire).run(
            limit=limit, dry_run=dry_run, progress=lambda n: progress.advance(task, n)
        )
    if report.skipped:
        console.print("another repair run holds the lock; nothing done")
        return 1
    if dry_run:
        console.print(f"{report.seen} users would be repaired")
        for human_id in report.dry_run[:50]:
            console.print(f"  {human_id}")
        if len(report.dry_run) > 50:
            console.print(f"  ... and {len(report.dry_run) - 50} more")
        return 0
    console.print(
        f"seen {report.seen}: repaired {report.repaired}, transient {report.transient} "
        f"(retried on a later run), permanent {report.permanent}, "
        f"superseded by a newer finish {report.superseded}"
    )
    return 0
