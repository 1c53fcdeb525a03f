"""The exchange task's Celery message, built here so the accept script can queue it itself.

`send_task` costs the web a thread hop, Kombu's publish path and a Redis round trip of its
own; the accept script (producer/claims.py) LPUSHes this message in the same atomic call
that claims the session. The message is what Celery's own `send_task` writes to the Redis
transport (protocol 2 headers from Celery's `as_task_v2`, in Kombu's JSON envelope);
`tests/test_message.py` compares the two field by field, so a Celery or Kombu upgrade that
changes the format fails a test instead of a worker.

One difference on purpose: the body is plain JSON, not base64 (Kombu reads a message without
a `body_encoding` as it is), so the accept script can put Redis's clock in it as the receive
time: the web writes `RECEIVED_PLACEHOLDER` and the script replaces `RECEIVED_MARKER`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from celery import Celery

from humanconnect.queue import EXCHANGE_TASK
from humanconnect.redis_keys import QUEUE
from humanconnect.request import ExchangeRequest

_TEMPLATE_ID = "template"
#: The receive time a web writes into a request; the accept script replaces it.
RECEIVED_PLACEHOLDER = -1
#: How `received_us: RECEIVED_PLACEHOLDER` reads inside a message: JSON in a JSON string.
RECEIVED_MARKER = json.dumps(json.dumps({"received_us": RECEIVED_PLACEHOLDER})[1:-1])[1:-1]
# The embed part of a protocol 2 body: no callbacks, chain or chord.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class MessageBuilder:
    """Celery protocol 2 messages for the exchange task, in Kombu's Redis envelope."""

    def __init__(self, celery: Celery):
        self.celery = celery
        # Celery names the sending process in each message; the same for all of ours.
        self.reply_to = celery.thread_oid
        # Celery's headers and properties, built once: per message only the task id (and what
        # repeats it) changes, and as_task_v2 per finish cost the web a few percent of its CPU.
        template = celery.amqp.as_task_v2(
            _TEMPLATE_ID, EXCHANGE_TASK, kwargs={}, argsrepr="()", kwargsrepr="", ignore_result=None
        )
        self._headers: dict[str, Any] = dict(template.headers)
        self._properties: dict[str, Any] = {
            **template.properties,
            "reply_to": self.reply_to,
            "argsrepr": "()",
            "delivery_mode": 2,
            "priority": 0,
        }

    def exchange(self, request: ExchangeRequest, queue: str = QUEUE) -> str:
        """The JSON to LPUSH onto `queue` for one exchange task, its id the request id (the
        queue is named in it too: Kombu puts an unacknowledged message back there, and the
        task learns from it whether a person waits)."""
        kwargs: dict[str, Any] = request.task_kwargs()
        task_id = request.request_id
        # Our own argument reprs: Celery shows them in logs and monitors, and they must never
        # show the sealed session token.
        kwargsrepr = f"{{'request_id': {task_id!r}}}"
        body = json.dumps([[], kwargs, _EMBED])
        return json.dumps(
            {
                "body": body,
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {
                    **self._headers,
                    "id": task_id,
                    "root_id": task_id,
                    "kwargsrepr": kwargsrepr,
                },
                "properties": {
                    **self._properties,
                    "correlation_id": task_id,
                    "kwargsrepr": kwargsrepr,
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    # Kombu's tag for the unacked hash while a worker holds the message.
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
        )
