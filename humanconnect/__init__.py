"""The core every process shares: settings, storage, the exchange, events, webhooks, limits.

Neither process lives here: the web is `producer`, the Celery worker and beat are `worker`;
both import this package, and it imports neither.
"""
