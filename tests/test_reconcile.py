"""The safety net: accepted requests that stop making progress are sent again."""

from __future__ import annotations

import json
import time

import redis

from humanconnect import status_records
from humanconnect.jobs.reconcile import requeue_stale
from humanconnect.redis_keys import PENDING
from humanconnect.redis_keys import request_status as request_key
from humanconnect.request import ExchangeRequest
from humanconnect.states import RequestState

TTL = 3600


def _accepted(r: redis.Redis, request_id: str, age_s: float) -> None:
    """What the producer leaves for an accepted request (see producer/claims.py confirm)."""
    r.hset(
        request_key(request_id),
        mapping={
            "state": "queued",
            "humanId": "h" * 24,
            "clientId": "c" * 40,
            "sealedSessionToken": "sealed-" + request_id,
            "receivedUs": "123",
        },
    )
    r.zadd(PENDING, {request_id: time.time() - age_s})


def test_only_stalled_requests_are_sent_again(redis_client: redis.Redis) -> None:
    """A request with no progress for the stale window is re-sent once; others are not."""
    sent: list[ExchangeRequest] = []
    _accepted(redis_client, "lost", age_s=600)
    _accepted(redis_client, "fresh", age_s=1)
    _accepted(redis_client, "done", age_s=600)
    status_records.set_state(redis_client, "done", RequestState.SUCCEEDED, TTL, humanId="h" * 24)
    assert requeue_stale(redis_client, sent.append, stale_s=150) == 1
    assert sent == [
        ExchangeRequest(
            request_id="lost",
            human_id="h" * 24,
            client_id="c" * 40,
            sealed_session_token="sealed-lost",
            received_us=123,
        )
    ]
    # Sent again means progress: not re-sent on the next pass; the finished one is gone.
    assert requeue_stale(redis_client, sent.append, stale_s=150) == 0
    assert redis_client.zscore(PENDING, "done") is None
    assert redis_client.zscore(PENDING, "fresh") is not None


def test_worker_progress_and_end_move_the_pending_set(redis_client: redis.Redis) -> None:
    """Running/retrying refresh a request's score; succeeded or failed removes it and the
    sealed token with it."""
    _accepted(redis_client, "r1", age_s=600)
    status_records.set_state(redis_client, "r1", RequestState.RUNNING, TTL)
    score = redis_client.zscore(PENDING, "r1")
    assert score is not None and score > time.time() - 5
    status_records.set_state(redis_client, "r1", RequestState.FAILED, TTL, error="x")
    assert redis_client.zscore(PENDING, "r1") is None
    assert redis_client.hget(request_key("r1"), "sealedSessionToken") is None


def test_operator_requeue_is_covered_with_its_fresh_window(redis_client: redis.Redis) -> None:
    """A request re-queued by `failed --retry` is re-sent with its fresh retry window."""
    _accepted(redis_client, "again", age_s=600)
    redis_client.hset(request_key("again"), "windowStartUs", "456")
    sent: list[ExchangeRequest] = []
    assert requeue_stale(redis_client, sent.append, stale_s=150) == 1
    assert sent[0].window_start_us == 456


def test_a_backlog_is_waiting_not_lost(redis_client: redis.Redis) -> None:
    """Requests behind the next queued message are not re-sent, however old; one that was
    ahead of it (popped, then lost) is."""
    queue = "hc-test-queue"
    _accepted(redis_client, "lost", age_s=600)
    _accepted(redis_client, "next", age_s=500)
    _accepted(redis_client, "behind", age_s=400)
    # The transport pushes on the left and pops on the right: "next" is taken first.
    for request_id in ("next", "behind"):
        redis_client.lpush(queue, json.dumps({"headers": {"id": request_id}, "body": ""}))
    sent: list[ExchangeRequest] = []
    assert requeue_stale(redis_client, sent.append, stale_s=150, queues=[queue]) == 1
    assert [k.request_id for k in sent] == ["lost"]
    # Once the queue has drained, what is still pending and stale is sent.
    redis_client.delete(queue)
    redis_client.zadd(PENDING, {"lost": time.time()})
    assert requeue_stale(redis_client, sent.append, stale_s=150, queues=[queue]) == 2
    # A queue whose next messages can't be placed makes the pass do nothing.
    redis_client.lpush(queue, b"not json")
    redis_client.zadd(PENDING, {"next": 0, "behind": 0})
    assert requeue_stale(redis_client, sent.append, stale_s=150, queues=[queue]) == 0


def test_a_request_in_either_queue_is_waiting_not_lost(redis_client: redis.Redis) -> None:
    """With two queues, the older of their heads decides: a request old enough to be stale
    by the ordinary queue's head but waiting in the other queue is not re-sent."""
    ordinary, waiting = "hc-test-queue", "hc-test-waiting"
    _accepted(redis_client, "lost", age_s=600)
    _accepted(redis_client, "held", age_s=550)
    _accepted(redis_client, "next", age_s=500)
    redis_client.lpush(ordinary, json.dumps({"headers": {"id": "next"}, "body": ""}))
    redis_client.lpush(waiting, json.dumps({"headers": {"id": "held"}, "body": ""}))
    sent: list[ExchangeRequest] = []
    assert requeue_stale(redis_client, sent.append, stale_s=150, queues=[waiting, ordinary]) == 1
    assert [k.request_id for k in sent] == ["lost"]
