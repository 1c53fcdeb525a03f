"""The service's core: settings, storage, the exchange and the Celery app (worker.celery)."""
