"""The queue every process speaks: task names, Celery's configuration, beat's schedule.

The web only sends (it builds exchange messages for its accept script), the worker consumes
and beat schedules; all three configure Celery from `celery_config`, so what one sends the
others read. Why each setting is what it is: worker/celery.py.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from humanconnect import redis_clients, tracing
from humanconnect.redis_keys import CONSUMED, PREFIX, QUEUE, WEBHOOK_QUEUE
from humanconnect.request import ExchangeRequest
from humanconnect.settings import Settings
from humanconnect.webhooks.deliveries import endpoint_digest

EXCHANGE_TASK = "humanconnect.exchange_session"
RELAY_TASK = "humanconnect.relay_events"
REPAIR_TASK = "humanconnect.repair_public_tokens"
RECONCILE_TASK = "humanconnect.reconcile_pending"
DELIVER_TASK = "humanconnect.deliver_webhooks"
RETENTION_TASK = "humanconnect.purge_expired"
MINT_TASK = "humanconnect.mint_token"
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


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for `settings`; kept a function so tests can build their own app."""
    broker_url, broker_options = redis_clients.broker(settings)
    redbeat_url, redbeat_options = redis_clients.redbeat(settings)
    return {
        "broker_url": broker_url,
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
            **broker_options,
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
        "redbeat_redis_url": redbeat_url,
        # A hung connection fails a pass well before the lock it renews would expire.
        "redbeat_redis_options": redbeat_options,
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
            "purge-expired": {
                "task": RETENTION_TASK,
                "schedule": settings.retention_interval_s,
                "options": {"expires": settings.retention_interval_s},
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


def sender(settings: Settings, name: str = "humanconnect-sender") -> Celery:
    """A Celery app that only sends (the web, the CLI, a test or the bench): the worker's
    configuration, so what it sends is what the worker reads; no tasks of its own."""
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def send_exchange(celery: Celery, request: ExchangeRequest) -> None:
    """Queue one exchange through `celery`, its task id the request id (the reconciler's and
    `failed --retry`'s path; the web queues its own inside the accept script), in the trace
    of the finish it re-sends when the request remembers one."""
    with tracing.resumed(request.trace_context):
        celery.send_task(EXCHANGE_TASK, kwargs=request.task_kwargs(), task_id=request.request_id)
