"""The drain baseline: a no-op task on a Celery app with the service's own settings."""

from typing import Any

from celery import Celery

from worker import broker
from worker.celery import celery_config
from worker.settings import get_settings

app = Celery("bench-noop")


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    # As worker.celery does: the same transport and settings, read at start.
    broker.install()
    sender.config_from_object({**celery_config(get_settings()), "beat_schedule": {}})


@app.task(name="bench.noop")
def noop(**_: object) -> None:
    """Does nothing: what the broker and the pool cost without the exchange."""
