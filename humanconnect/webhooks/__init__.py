"""Webhooks: every event delivered, signed per the Standard Webhooks specification, to each
endpoint in HUMANCONNECT_WEBHOOK_URLS, at least once.

- `signing`: the secret, the body and the three headers of one attempt.
- `deliveries`: the delivery records (one per event and endpoint, written in the event's own
  transaction), their schedule, claims and outcomes.
- `sender`: one HTTP attempt: no redirects, TLS verified, a 2xx within the timeout or not.
- `dispatch`: the Celery task's loop for one endpoint: claim what is due, send it, record it.
"""
