"""A `503` whose accept call still reached Redis after the web stopped waiting (1 s): the
session is queued all the same, and the client that sends again gets it as a duplicate
(`202`, the first requestId), never a second request."""

from __future__ import annotations

import threading
import time

import redis
from fastapi.testclient import TestClient

from humanconnect.redis_keys import PENDING, QUEUES, request_status
from tests import factories

# Keeps Redis busy for ARGV[1] µs by its own clock.
SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
  t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1])
return 1
"""


def test_a_late_accept_is_queued_and_the_resend_is_its_duplicate(
    client: TestClient, redis_client: redis.Redis
) -> None:
    body = factories.finish_body()
    # A finish first, so the web holds an open connection: the late call is then the accept
    # script itself, not a connection's handshake.
    assert client.post("/connect/finish", json=factories.finish_body()).status_code == 202
    redis_client.delete(*QUEUES, PENDING)
    # Redis runs a script that keeps it busy for 1.5 s: the accept call waits past the web's
    # 1 s deadline (the web gives up and closes its connection), and Redis still runs the
    # call it had already been sent once the script ends.
    busy = redis.Redis(connection_pool=redis_client.connection_pool)
    threading.Thread(target=lambda: busy.eval(SPIN, 0, 1_500_000), daemon=True).start()
    time.sleep(0.1)
    first = client.post("/connect/finish", json=body)
    assert first.status_code == 503 and first.headers["Retry-After"]
    time.sleep(1.6)
    # The call that the web gave up on was queued when Redis came back.
    assert sum(redis_client.llen(q) for q in QUEUES) == 1
    [raw] = redis_client.zrange(PENDING, 0, -1)
    assert isinstance(raw, bytes)
    request_id = raw.decode()
    assert redis_client.hget(request_status(request_id), "state") == b"queued"
    again = client.post("/connect/finish", json=body)
    assert again.status_code == 202
    assert again.json()["requestId"] == request_id
    assert sum(redis_client.llen(q) for q in QUEUES) == 1
