"""The exchange message the accept script queues is what Celery's `send_task` writes, but for
its body's encoding: plain JSON, where Celery's is base64 (see producer/message.py)."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import replace

import redis
from celery import Celery

from humanconnect.queue import EXCHANGE_TASK, sender
from humanconnect.redis_keys import QUEUE, WAITING_QUEUE
from humanconnect.request import ExchangeRequest
from humanconnect.settings import Settings
from producer.message import RECEIVED_MARKER, RECEIVED_PLACEHOLDER, MessageBuilder

REQUESTS = [
    ExchangeRequest(
        request_id="r" * 22,
        human_id="h" * 24,
        client_id="c" * 40,
        sealed_session_token="gAAAAAsealed",
        received_us=1764316800000000,
    ),
    ExchangeRequest(
        request_id="another-request-id-0001",
        human_id="g" * 24,
        client_id="c" * 40,
        sealed_session_token="gAAAAAsealed2",
        received_us=1764316800000001,
        window_start_us=1764316900000000,
        expected_client_user_id="alice@example.com",
    ),
]


def _celerys_own(app: Celery, r: redis.Redis, request: ExchangeRequest, queue: str = QUEUE) -> dict:
    """What Celery's own publish of `request` to `queue` wrote to a real Redis."""
    app.send_task(
        EXCHANGE_TASK,
        kwargs=request.task_kwargs(),
        task_id=request.request_id,
        retry=False,
        argsrepr="()",
        kwargsrepr=f"{{'request_id': {request.request_id!r}}}",
        queue=queue,
    )
    raw = r.rpop(queue)
    assert isinstance(raw, bytes)
    message = dict(json.loads(raw))
    # Kombu's base64, read as a worker's Kombu reads it: our message is the plain JSON.
    assert message["properties"].pop("body_encoding") == "base64"
    message["body"] = base64.b64decode(message["body"]).decode()
    return message


def test_the_message_matches_celerys_own(redis_url: str, redis_client: redis.Redis) -> None:
    """For each request (one builder, several ids): every field is what Celery writes, but
    Kombu's per-message delivery tag; the body carries the task's kwargs."""
    app = sender(Settings.model_validate({"REDIS_URL": redis_url}), "test-sender")
    builder = MessageBuilder(app)
    tags = []
    for request in REQUESTS:
        # Given Celery's own publish of the same task
        theirs = _celerys_own(app, redis_client, request)
        # When we build the message ourselves (twice)
        ours = json.loads(builder.exchange(request))
        again = json.loads(builder.exchange(request))
        # Then every field is Celery's, except the delivery tag: a fresh UUID each time
        tags += [m["properties"].pop("delivery_tag") for m in (theirs, ours, again)]
        assert ours == theirs == again
        # And the body carries the kwargs a worker will call the task with
        args, kwargs, _embed = json.loads(ours["body"])
        assert (args, kwargs) == ([], request.task_kwargs())
    assert len({uuid.UUID(t) for t in tags}) == len(tags)


def test_the_receive_time_marker_is_in_the_message() -> None:
    """The accept script stamps Redis's clock where the marker is: it must be there once."""
    app = Celery("test-sender")
    request = replace(REQUESTS[1], received_us=RECEIVED_PLACEHOLDER)
    message = MessageBuilder(app).exchange(request)
    assert message.count(RECEIVED_MARKER) == 1
    stamped = message.replace(RECEIVED_MARKER, RECEIVED_MARKER[:-2] + "1764316800000042")
    _args, kwargs, _embed = json.loads(json.loads(stamped)["body"])
    assert kwargs == {**request.task_kwargs(), "received_us": 1764316800000042}


def test_the_waiting_queues_message_matches_celerys_own(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A message for the waiting queue is Celery's own publish to that queue: it names the
    queue, so a worker knows a person waits and Kombu puts it back there if unacknowledged."""
    app = sender(Settings.model_validate({"REDIS_URL": redis_url}), "test-sender")
    request = REQUESTS[0]
    theirs = _celerys_own(app, redis_client, request, WAITING_QUEUE)
    ours = json.loads(MessageBuilder(app).exchange(request, WAITING_QUEUE))
    for message in (theirs, ours):
        message["properties"].pop("delivery_tag")
    assert ours == theirs
    assert ours["properties"]["delivery_info"]["routing_key"] == WAITING_QUEUE
