"""Read humanconnect's completion events with a consumer group, at least once, deduped.

    REDIS_URL=redis://127.0.0.1:6379/0 python examples/consumer.py [--once]

Each consumer in the group gets its own share of entries; an entry is acknowledged (XACK)
only after it was handled, so a consumer that dies leaves it pending for another to claim.
The same event can arrive twice (a relay that died between XADD and its bookkeeping): the
`eventId` is what to dedupe on.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import redis

STREAM = os.environ.get("HUMANCONNECT_EVENTS_STREAM", "humanconnect:events")
GROUP = "my-app"
CONSUMER = socket.gethostname()


def handle(event: dict[str, str]) -> None:
    # Your code: mark the user as connected, start a data sync, tell the user, ...
    sys.stdout.write(f"{event['type']} humanId={event['humanId']} eventId={event['eventId']}\n")
    sys.stdout.flush()


def main() -> None:
    r = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    try:
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    once = "--once" in sys.argv
    while True:
        # ">" = entries never delivered to this group; block up to 5 s for new ones.
        batches: Any = r.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=100, block=5000)
        for _stream, entries in batches or []:
            for entry_id, event in entries:
                # Dedupe on eventId for a day: SET NX succeeds only the first time.
                if r.set(f"{GROUP}:seen:{event['eventId']}", 1, nx=True, ex=86400):
                    handle(event)
                r.xack(STREAM, GROUP, entry_id)
        if once:
            return


if __name__ == "__main__":
    main()
