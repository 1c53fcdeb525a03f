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
from datetime import timedelta
from typing import Any

from celery import Celery

from humanconnect import tracing
from humanconnect.clock import now
from humanconnect.minting import FLIGHT_TTL_S
from humanconnect.queue import EXCHANGE_TASK, MINT_TASK
from humanconnect.redis_keys import QUEUE, WAITING_QUEUE
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
        kwargs = request.task_kwargs()
        return self._message(EXCHANGE_TASK, kwargs, "request_id", kwargs["request_id"], queue)

    def mint(self, mint_id: str, user: str, kind: str, email: str | None = None) -> str:
        """The JSON to LPUSH onto the waiting queue for one `mint_token` task (a person
        waits on it: humanconnect/minting.py)."""
        kwargs: dict[str, Any] = {"mint_id": mint_id, "user": user, "kind": kind}
        if email:
            kwargs["email"] = email
        # Nobody waits for a mint past its flight: a worker that takes it later (a redelivery
        # after a crash, a long queue) drops it rather than minting for someone long gone.
        expires = (now() + timedelta(seconds=FLIGHT_TTL_S)).isoformat()
        return self._message(MINT_TASK, kwargs, "mint_id", mint_id, WAITING_QUEUE, expires=expires)

    def _message(
        self,
        task: str,
        kwargs: dict[str, Any],
        id_name: str,
        task_id: str,
        queue: str,
        expires: str | None = None,
    ) -> str:
        # Our own argument reprs: Celery shows them in logs and monitors, and they must never
        # show the sealed session token (nor a user's email address): only the id.
        kwargsrepr = f"{{{id_name!r}: {task_id!r}}}"
        body = json.dumps([[], kwargs, _EMBED])
        return json.dumps(
            {
                "body": body,
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {
                    **self._headers,
                    "task": task,
                    # The trace context, where Celery's instrumentation reads it (none when off).
                    **tracing.headers(),
                    "id": task_id,
                    "expires": expires,
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
