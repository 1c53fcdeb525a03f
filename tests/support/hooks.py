"""What the webhook tests share: the secret, a schedule with no waits, one endpoint's
dispatcher, committed events and the delivery rows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from humanconnect import events
from humanconnect.runtime import Runtime
from humanconnect.storage.models import WebhookDelivery
from humanconnect.webhooks import signing
from humanconnect.webhooks.dispatch import Dispatcher
from humanconnect.webhooks.sender import Sender
from tests import factories

SECRET = signing.new_secret()
SCHEDULE = "0,0,0"


def dispatcher(rt: Runtime, endpoint: str | None = None, concurrency: int = 4) -> Dispatcher:
    return Dispatcher(
        rt,
        endpoint or rt.settings.webhook_urls[0],
        Sender(rt.settings.webhook_timeout_s),
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
