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
  per endpoint, each starting that endpoint's dispatcher (worker/webhooks/dispatch.py).
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
from kombu import Queue

from worker import broker
from worker.redis_keys import CONSUMED, PREFIX, QUEUE, WEBHOOK_QUEUE
from worker.request import ExchangeRequest
from worker.settings import Settings, settings_or_exit
from worker.webhooks.deliveries import endpoint_digest

EXCHANGE_TASK = "humanconnect.exchange_session"
RELAY_TASK = "humanconnect.relay_events"
REPAIR_TASK = "humanconnect.repair_public_tokens"
RECONCILE_TASK = "humanconnect.reconcile_pending"
DELIVER_TASK = "humanconnect.deliver_webhooks"
# How often beat starts each endpoint's webhook dispatcher (which then runs while any is due).
WEBHOOK_TICK_S = 1.0
# How often beat sweeps the outbox for events a worker could not relay itself.
RELAY_INTERVAL_S = 5.0
# Beat's schedule and lock live in Redis under this prefix (RedBeat's keys; see worker/beat.py).
BEAT_KEY_PREFIX = PREFIX + "redbeat:"
# The lock the sending beat renews on every pass; a standby takes over at most this long (plus
# one pass) after the sender dies.
BEAT_LOCK_TIMEOUT_S = 10
# The longest a beat sleeps between passes: how often the sender renews its lock when nothing is
# due sooner, and how often a standby tries to take it.
BEAT_MAX_LOOP_S = 1.0

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


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for `settings`; kept a function so tests can build their own app."""
    redis_url = settings.redis_url or "redis://127.0.0.1:6379/0"
    return {
        "broker_url": redis_url,
        "broker_connection_retry_on_startup": True,
        # The producer must answer 503 within 2 s when Redis is away, not hang on a retry.
        "broker_connection_timeout": 1.0,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 1.0,
            "socket_timeout": 5.0,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "queue_order_strategy": "priority",
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": QUEUE,
        # In the order Kombu's `priority` strategy takes them: the waiting queue first.
        "task_queues": [Queue(name, routing_key=name) for name in CONSUMED],
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        # RedBeat's, by name: only beat imports it.
        "beat_scheduler": "worker.beat:Scheduler",
        "beat_max_loop_interval": BEAT_MAX_LOOP_S,
        "redbeat_redis_url": redis_url,
        # A hung connection fails a pass well before the lock it renews would expire.
        "redbeat_redis_options": {"socket_connect_timeout": 1.0, "socket_timeout": 5.0},
        "redbeat_key_prefix": BEAT_KEY_PREFIX,
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT_S,
        "beat_schedule": {
            "relay-events": {
                "task": RELAY_TASK,
                "schedule": RELAY_INTERVAL_S,
                # A sweep that waited longer than one interval is superseded by the next.
                "options": {"expires": RELAY_INTERVAL_S},
            },
            "reconcile-pending": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval_s,
                "options": {"expires": settings.reconcile_interval_s},
            },
            "repair-public-tokens": {
                "task": REPAIR_TASK,
                "schedule": settings.repair_interval_s,
                "options": {"expires": settings.repair_interval_s},
            },
            **webhook_schedule(settings),
        },
    }


def webhook_schedule(settings: Settings) -> dict[str, Any]:
    """A tick per endpoint on the webhooks queue. The message names the endpoint by digest
    only (a URL may carry a credential); each worker maps it back from its own settings."""
    return {
        f"deliver-webhooks-{digest}": {
            "task": DELIVER_TASK,
            "schedule": WEBHOOK_TICK_S,
            "args": (digest,),
            "options": {"queue": WEBHOOK_QUEUE, "expires": WEBHOOK_TICK_S},
        }
        for digest in map(endpoint_digest, settings.webhook_urls)
    }


def send_exchange(request: ExchangeRequest) -> None:
    """Queue one exchange through Celery, its task id the request id (the reconciler's and
    `failed --retry`'s path; the web queues its own inside the accept script)."""
    app.send_task(EXCHANGE_TASK, kwargs=request.task_kwargs(), task_id=request.request_id)
