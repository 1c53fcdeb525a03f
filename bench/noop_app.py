"""The drain baseline: a no-op task on a Celery app with the service's own settings."""

from typing import Any

from celery import Celery

from humanconnect.startup import settings_or_exit
from worker.celery import configure

app = Celery("bench-noop")


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    # As worker.celery does: the same transport and settings, read at start.
    configure(sender, settings_or_exit(), beat_schedule={})


@app.task(name="bench.noop")
def noop(**_: object) -> None:
    """Does nothing: what the broker and the pool cost without the exchange."""
