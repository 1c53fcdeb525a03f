"""The Celery app, configured so that nothing accepted is lost.

- Late acks: a message leaves Redis only after its task returned (or re-queued itself).
- A task whose worker dies is re-queued (reject on worker lost; for a SIGKILLed worker,
  the broker's visibility timeout brings the message back).
- Prefetch of one per thread: a busy worker doesn't hoard messages another could run.
- Visibility timeout (Settings.visibility_timeout_s) at least twice every countdown the code
  sets, and checked every 10 s, so a crashed worker's sessions are back in the queue within
  about 3 minutes of a worker running again.
- JSON only, no result backend: no token can end up in a result.
- Two queues, drained in order (Kombu's `priority` queue order): finishes a person waits on
  (WAITING_QUEUE) before everything else. A separate queue rather than message priorities:
  Kombu's Redis priorities are four coarse lists per queue all the same, and one queue per
  lane is what an operator can see (`LLEN`) and run workers for apart. The web caps the
  waiting queue's share of the upstream (producer/lanes.py), so the other queue is never
  starved past a stated bound.
- Webhook deliveries tick on a third queue, taken before the ordinary one: a tick a second
  per endpoint, each starting that endpoint's dispatcher (humanconnect/webhooks/dispatch.py).
- Beat's schedule and lock in Redis (RedBeat, worker/beat.py): any number of beats may run;
  the one holding the lock sends, and another takes over about BEAT_LOCK_TIMEOUT_S after it
  dies.
- Thread pool: an exchange is I/O (waiting on the upstream), so many threads per process keep
  the upstream's latency hidden without as many processes' memory.

Importing this module only defines the app: it is configured from the settings when Celery
first reads its configuration (`on_configure`), which is also when the broker transport fix
is installed. The Procfile names the app: `celery -A worker.celery:app`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from humanconnect import queue
from humanconnect.queue import celery_config
from humanconnect.request import ExchangeRequest
from humanconnect.settings import Settings
from humanconnect.startup import settings_or_exit
from worker import broker

app = Celery("humanconnect", include=["worker.tasks"])


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    # Runs once, the first time anything reads the app's configuration (the worker and beat
    # at start, a CLI command before it sends): never at import.
    configure(sender, settings_or_exit())


def configure(celery: Celery, settings: Settings, **overrides: Any) -> None:
    """Give `celery` the service's transport and configuration (call it before the app's
    configuration is first read, or from its `on_configure`)."""
    broker.install()
    celery.config_from_object({**celery_config(settings), **overrides})


def send_exchange(request: ExchangeRequest) -> None:
    """Queue one exchange through this app (the reconciler's path)."""
    queue.send_exchange(app, request)
