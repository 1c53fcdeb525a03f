"""The drain baseline: a no-op task on a Celery app with the service's own settings."""

from celery import Celery

from worker.celery import celery_config
from worker.settings import get_settings

app = Celery("bench-noop")
app.conf.update(celery_config(get_settings()))
app.conf.beat_schedule = {}


@app.task(name="bench.noop")
def noop(**_: object) -> None:
    """Does nothing: what the broker and the pool cost without the exchange."""
