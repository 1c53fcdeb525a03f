"""A `503` whose accept call still reached Redis after the web stopped waiting (1 s): the
session is queued all the same, and the client that sends again gets it as a duplicate
(`202`, the first requestId), never a second request."""

from __future__ import annotations

import threading

import redis
from fastapi.testclient import TestClient

from humanconnect.redis_keys import PENDING, QUEUES, request_status
from tests import factories
from tests.support.env import wait_for
from tests.support.servers import SPIN, BusyProbe


def test_a_late_accept_is_queued_and_the_resend_is_its_duplicate(
    client: TestClient, redis_client: redis.Redis, redis_url: str
) -> None:
    body = factories.finish_body()
    # A finish first, so the web holds an open connection: the late call is then the accept
    # script itself, not a connection's handshake.
    assert client.post("/connect/finish", json=factories.finish_body()).status_code == 202
    redis_client.delete(*QUEUES, PENDING)
    # Redis runs a script that keeps it busy for 3 s (under its 5 s busy-reply threshold, so
    # other calls wait rather than fail): the accept call waits past the web's 1 s deadline
    # (the web gives up and closes its connection), and Redis still runs the call it had
    # already been sent once the script ends.
    busy = redis.Redis(connection_pool=redis_client.connection_pool)
    probe = BusyProbe(redis_url)
    threading.Thread(target=lambda: busy.eval(SPIN, 0, 3_000_000), daemon=True).start()
    wait_for(probe.busy, 10, interval=0.01, what="Redis busy")
    probe.close()
    first = client.post("/connect/finish", json=body)
    assert first.status_code == 503 and first.headers["Retry-After"]
    # The call that the web gave up on was queued when Redis came back (the count waits
    # for the script's end like any call).
    assert sum(redis_client.llen(q) for q in QUEUES) == 1
    [raw] = redis_client.zrange(PENDING, 0, -1)
    assert isinstance(raw, bytes)
    request_id = raw.decode()
    assert redis_client.hget(request_status(request_id), "state") == b"queued"
    again = client.post("/connect/finish", json=body)
    assert again.status_code == 202
    assert again.json()["requestId"] == request_id
    assert sum(redis_client.llen(q) for q in QUEUES) == 1
