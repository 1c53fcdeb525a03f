"""The waiting queue's share: a waiting finish goes to the waiting queue while the lane has
room, and to the ordinary queue past it (a real Redis, the real accept script)."""

from __future__ import annotations

import asyncio
import json
import secrets

import redis
from redis.asyncio import Redis as AsyncRedis

from humanconnect.crypto import Cipher
from humanconnect.queue import sender
from humanconnect.redis_keys import PENDING, QUEUE, WAITING_QUEUE
from humanconnect.settings import Settings
from humanconnect.upstream.limiter import slot_interval
from producer.accept import Acceptor
from producer.body import FinishBody
from producer.claims import Claims
from producer.lanes import BURST_S, SHARE, WaitingLane
from producer.message import MessageBuilder
from tests.support.env import CLIENT_ID, FERNET_KEY


def _body() -> FinishBody:
    return FinishBody(
        humanId=secrets.token_hex(12), clientId=CLIENT_ID, sessionToken=secrets.token_hex(16)
    )


def _accept_all(redis_url: str, max_rps: float, waiting: list[bool]) -> None:
    async def run() -> None:
        app = sender(Settings.model_validate({"REDIS_URL": redis_url}), "test-lanes")
        r = AsyncRedis.from_url(redis_url)
        claims = Claims(r, 60, WaitingLane.for_rate(max_rps))
        acceptor = Acceptor(claims, MessageBuilder(app), Cipher([FERNET_KEY]))
        for w in waiting:
            await acceptor.accept(_body(), waiting=w)
        await r.aclose()

    asyncio.run(run())


def _queued_ids(r: redis.Redis, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in r.lrange(queue, 0, -1)]


def test_waiting_finishes_fill_their_burst_then_go_to_the_ordinary_queue(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """At 2 calls/s the waiting queue admits a burst of 10 (5 s of upstream calls); the
    eleventh to fifteenth waiting finishes and every ordinary one go to the ordinary queue,
    each accepted once, whole."""
    _accept_all(redis_url, 2, [True] * 15 + [False] * 3)
    burst = round(BURST_S / slot_interval(2))
    waiting = _queued_ids(redis_client, WAITING_QUEUE)
    ordinary = _queued_ids(redis_client, QUEUE)
    assert (len(waiting), len(ordinary)) == (burst, 15 - burst + 3)
    # Every message is in its queue's own shape, and every request is pending exactly once.
    for queue in (WAITING_QUEUE, QUEUE):
        for raw in redis_client.lrange(queue, 0, -1):
            assert json.loads(raw)["properties"]["delivery_info"]["routing_key"] == queue
    assert redis_client.zcard(PENDING) == 18
    assert set(waiting).isdisjoint(ordinary)


def test_the_lane_refills_at_its_share_of_the_pace(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Once the burst is spent, the lane admits one more waiting finish per 1/(SHARE·R)
    seconds: at 2 calls/s, one per second."""
    _accept_all(redis_url, 2, [True] * 11)
    assert redis_client.llen(WAITING_QUEUE) == 10
    asyncio.run(asyncio.sleep(1 / (SHARE * 2) + 0.05))
    _accept_all(redis_url, 2, [True, True])
    assert redis_client.llen(WAITING_QUEUE) == 11
    assert redis_client.llen(QUEUE) == 2


def test_the_stated_bound() -> None:
    """The documented bound: twice the unshared wait, plus twice the burst."""
    lane = WaitingLane.for_rate(20)
    assert lane.starvation_bound_s(5.0) == 2 * 5.0 + 2 * BURST_S
    # Half the workers' pace (20/s less the limiter's spacing), a burst of 5 s of it.
    pace = 1 / slot_interval(20)
    assert lane.interval_us == round(1e6 / (SHARE * pace))
    assert lane.tolerance_us == round((round(BURST_S * pace) - 1) * 1e6 / (SHARE * pace))
