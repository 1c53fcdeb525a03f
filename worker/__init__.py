"""The background half: Celery app, tasks, storage. `celery -A worker` finds `app` here."""

from worker.celery import app

__all__ = ["app"]
