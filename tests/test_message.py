"""The exchange message the accept script queues is exactly what Celery's `send_task` writes."""

from __future__ import annotations

import base64
import json
import uuid

import redis
from celery import Celery

from producer.message import MessageBuilder
from worker.celery import EXCHANGE_TASK, celery_config
from worker.redis_keys import QUEUE
from worker.request import ExchangeRequest
from worker.settings import Settings

REQUEST = ExchangeRequest(
    request_id="r" * 22,
    human_id="h" * 24,
    client_id="c" * 40,
    sealed_session_token="gAAAAAsealed",
    received_us=1764316800000000,
)
KWARGS = REQUEST.task_kwargs()


def test_the_message_matches_celerys_own(redis_url: str, redis_client: redis.Redis) -> None:
    # Given Celery's own publish of the same task to a real Redis
    app = Celery("test-sender")
    app.conf.update(celery_config(Settings.model_validate({"REDIS_URL": redis_url})))
    app.send_task(
        EXCHANGE_TASK,
        kwargs=KWARGS,
        task_id=KWARGS["request_id"],
        retry=False,
        argsrepr="()",
        kwargsrepr=f"{{'request_id': {KWARGS['request_id']!r}}}",
    )
    raw = redis_client.rpop(QUEUE)
    assert isinstance(raw, bytes)
    theirs = json.loads(raw)
    # When we build the message ourselves
    builder = MessageBuilder(app)
    ours = json.loads(builder.exchange(REQUEST))
    again = json.loads(builder.exchange(REQUEST))
    # Then every field is Celery's, except Kombu's per-message delivery tag: a fresh UUID
    tags = [m["properties"].pop("delivery_tag") for m in (theirs, ours, again)]
    assert ours == theirs
    assert len({uuid.UUID(t) for t in tags}) == 3
    # And the body carries the kwargs a worker will call the task with
    args, kwargs, _embed = json.loads(base64.b64decode(ours["body"]))
    assert (args, kwargs) == ([], KWARGS)
