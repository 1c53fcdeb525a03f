"""`humanconnect webhooks ...`: a new secret, the deliveries, retrying them, a test send."""

from __future__ import annotations

import re
import sys
import time
import uuid
from datetime import datetime, timedelta

from rich.console import Console
from rich.table import Table

from humanconnect.clock import now
from humanconnect.errors import ConfigError
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings
from humanconnect.webhooks import deliveries, signing
from humanconnect.webhooks.sender import Sender, safe_url

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str) -> datetime:
    """`2h`, `30m`, `1d` ago, or an ISO 8601 time (UTC unless it says otherwise)."""
    match = _DURATION.match(value.strip())
    if match:
        return now() - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--since {value!r}: give a time like 2026-11-28T20:00 or 2h") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=now().tzinfo)


def secret() -> int:
    sys.stdout.write(signing.new_secret() + "\n")
    return 0


def listing(settings: Settings, *, failed_only: bool, limit: int) -> int:
    rt = Runtime(settings)
    with rt.db() as db:
        rows = deliveries.listing(db, failed_only=failed_only, limit=limit)
        backlog = deliveries.backlog(db)
    # Piped (grep, a file): full lines, no wrapped ids.
    console = Console(width=None if sys.stdout.isatty() else 200)
    title = f"{len(rows)} {'failed ' if failed_only else ''}deliveries (newest first)"
    table = Table(title=title)
    for col in ("eventId", "type", "endpoint", "state", "attempts", "next", "last"):
        table.add_column(col)
    stamp = now().timestamp()
    for d in rows:
        due = ""
        if d.state == deliveries.PENDING:
            due = f"in {max(0.0, d.due_us / 1e6 - stamp):.0f}s"
        last = d.last_error or (f"HTTP {d.last_status}" if d.last_status else "")
        table.add_row(d.event_id, d.type, safe_url(d.endpoint), d.state, str(d.attempts), due, last)
    console.print(table)
    for url, n in sorted(backlog.items()):
        console.print(f"pending for {safe_url(url)}: {n}")
    return 0


def retry(settings: Settings, *, failed_only: bool, since: str | None) -> int:
    rt = Runtime(settings)
    with rt.db() as db:
        count = deliveries.retry(
            db, failed_only=failed_only, since=parse_since(since) if since else None
        )
    what = "failed" if failed_only else "failed or pending"
    sys.stdout.write(f"{count} {what} deliveries are due now, with a fresh schedule\n")
    return 0


def test(settings: Settings, url: str) -> int:
    """Send one signed `webhook.test` event to `url` and print the answer."""
    if settings.webhook_secret is None:
        raise ConfigError("HUMANCONNECT_WEBHOOK_SECRET is required to sign a test event")
    if not url.startswith(("http://", "https://")):
        raise ConfigError("the URL must start with http:// or https://")
    signer = signing.Signer.from_secret(settings.webhook_secret.get_secret_value())
    event_id = str(uuid.uuid4())
    stamp = now()
    body = signing.body(
        {"type": "webhook.test", "eventId": event_id, "occurredAt": stamp.isoformat()}
    )
    started = time.monotonic()
    result = Sender(settings.webhook_timeout_s).send(
        url, body, signer.headers(event_id, body, stamp)
    )
    took_ms = (time.monotonic() - started) * 1000
    answer = f"HTTP {result.status}" if result.status is not None else result.error
    verdict = "delivered" if result.delivered else f"not delivered ({result.error})"
    sys.stdout.write(
        f"webhook.test {event_id} to {safe_url(url)}: {answer} in {took_ms:.0f} ms, {verdict}\n"
    )
    if result.response:
        sys.stdout.write(f"answer: {result.response}\n")
    return 0 if result.delivered else 1
