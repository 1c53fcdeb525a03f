"""What the webhook tests share: the secret, a schedule with no waits, one endpoint's
dispatcher, committed events and the delivery rows; and for a whole deployment (the chaos
harness), its webhook settings and the wait for every event to reach the receiver."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select

from humanconnect import events
from humanconnect.runtime import Runtime
from humanconnect.storage.models import WebhookDelivery
from humanconnect.webhooks import signing
from humanconnect.webhooks.dispatch import Dispatcher
from humanconnect.webhooks.sender import Sender
from tests import factories
from tests.support.chaos import Chaos
from tests.support.env import wait_for
from tests.support.receiver import Receiver
from tests.support.scan import stream_entries

SECRET = signing.new_secret()
SCHEDULE = "0,0,0"


def dispatcher(
    rt: Runtime,
    endpoint: str | None = None,
    concurrency: int = 4,
    timeout_s: float | None = None,
) -> Dispatcher:
    return Dispatcher(
        rt,
        endpoint or rt.settings.webhook_urls[0],
        Sender(timeout_s or rt.settings.webhook_timeout_s),
        signing.Signer.from_secret(SECRET),
        ThreadPoolExecutor(concurrency),
        concurrency,
    )


def completed(rt: Runtime, n: int = 1) -> list[str]:
    """Commit `n` connect.completed events as the exchange does; their eventIds."""
    ids = []
    with rt.db() as db:
        for _ in range(n):
            event = events.record(
                db,
                "connect.completed",
                targets=rt.webhook_targets,
                humanId=factories.human_id(),
                clientUserId="user-1",
                requestId="req-1",
            )
            ids.append(event.event_id)
        db.commit()
    return ids


def rows(rt: Runtime) -> list[WebhookDelivery]:
    with rt.db() as db:
        return list(db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all())


CHAOS_SECRET = signing.new_secret()
# Seconds instead of minutes, as HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE lets operators do: ten
# attempts over about a minute, so a receiver down for 15 s is outlasted.
CHAOS_WEBHOOK_ENV = {
    "HUMANCONNECT_WEBHOOK_SECRET": CHAOS_SECRET,
    "HUMANCONNECT_WEBHOOK_TIMEOUT_S": "1",
    "HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE": "0,1,2,4,8,8,8,8,8,8",
    "HUMANCONNECT_WEBHOOK_CONCURRENCY": "4",
}


def chaos_hooked(chaos: Chaos, receiver: Receiver, **extra: str) -> Chaos:
    """The deployment started with its webhooks going to `receiver`."""
    env: dict[str, Any] = {
        "HUMANCONNECT_WEBHOOK_URLS": receiver.url,
        **CHAOS_WEBHOOK_ENV,
        **extra,
    }
    return chaos.start(**env)


def event_ids(chaos: Chaos) -> dict[str, dict[str, str]]:
    """The stream's events by eventId."""
    return {e["eventId"]: e for e in stream_entries(chaos.r)}


def wait_all_delivered(chaos: Chaos, receiver: Receiver, timeout: float) -> dict[str, dict]:
    """Until every event on the stream has been answered 2xx by the receiver."""
    wait_for(
        lambda: event_ids(chaos).keys() <= receiver.delivered_ids(),
        timeout,
        interval=1,
        what="every event to reach the receiver",
    )
    return event_ids(chaos)
