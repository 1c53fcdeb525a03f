"""The producer's HTTP contract, in process, against a real Redis and SQLite."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
import redis
from fastapi.testclient import TestClient

from humanconnect import redis_keys
from humanconnect.redis_keys import QUEUE
from humanconnect.settings import Settings
from tests import factories
from tests.support.env import CLIENT_ID, CLIENT_SECRET, HANG_GUARD, timed
from tests.support.scan import assert_no_secrets, redis_text, task_kwargs
from tests.support.servers import RedisServer

JSON = {"Content-Type": "application/json"}


def queued_messages(r: redis.Redis) -> list[dict]:
    return [json.loads(m) for m in r.lrange(QUEUE, 0, -1)]


def nothing_written(r: redis.Redis) -> bool:
    return r.llen(QUEUE) == 0 and not r.keys(redis_keys.PREFIX + "*")


def test_accepts_and_points_to_status(client: TestClient, redis_client: redis.Redis) -> None:
    """A valid finish gets 202, a Location equal to statusUrl, and one queued message."""
    body = factories.finish_body()
    resp = client.post("/connect/finish", json=body)
    assert resp.status_code == 202
    data = resp.json()
    assert data["status"] == "queued"
    assert resp.headers["Location"] == data["statusUrl"] == f"/connect/finish/{data['requestId']}"
    assert len(data["requestId"]) >= 22  # 128 bits, URL-safe base64
    messages = queued_messages(redis_client)
    assert len(messages) == 1
    status = client.get(data["statusUrl"])
    assert status.status_code == 200
    assert status.json() == {
        "requestId": data["requestId"],
        "status": "queued",
        "humanId": body["humanId"],
    }


def test_queue_message_holds_no_secret_and_no_clear_session_token(
    client: TestClient, redis_client: redis.Redis
) -> None:
    """The queued message carries a sealed session token, never it in clear, never the secret."""
    body = factories.finish_body()
    client.post("/connect/finish", json=body)
    dump = redis_text(redis_client)
    assert body["humanId"].encode() in dump, "the scan must see the queued message's payload"
    assert_no_secrets([body["sessionToken"], CLIENT_SECRET], redis_client=redis_client)


def test_snake_case_and_extra_fields(client: TestClient, redis_client: redis.Redis) -> None:
    """snake_case is accepted, unknown fields are dropped, camelCase wins when both appear."""
    body = factories.finish_body()
    resp = client.post(
        "/connect/finish",
        json={
            "human_id": "snake",
            "humanId": body["humanId"],
            "client_id": body["clientId"],
            "session_token": body["sessionToken"],
            "userId": "local-42",
        },
    )
    assert resp.status_code == 202
    status = client.get(resp.json()["statusUrl"]).json()
    assert status["humanId"] == body["humanId"]
    kwargs = task_kwargs(queued_messages(redis_client)[0])
    assert "local-42" not in json.dumps(kwargs)
    assert kwargs["human_id"] == body["humanId"]


BAD = [
    # (what, headers, raw body, status, field)
    ("not json", JSON, b"{nope", 400, None),
    ("json array", JSON, b"[]", 400, None),
    (
        "missing humanId",
        JSON,
        json.dumps({"clientId": CLIENT_ID, "sessionToken": "a" * 32}).encode(),
        400,
        "humanId",
    ),
    (
        "empty sessionToken",
        JSON,
        json.dumps({"humanId": "h1", "clientId": CLIENT_ID, "sessionToken": ""}).encode(),
        400,
        "sessionToken",
    ),
    (
        "number humanId",
        JSON,
        json.dumps({"humanId": 12, "clientId": CLIENT_ID, "sessionToken": "a"}).encode(),
        400,
        "humanId",
    ),
    (
        "bad characters",
        JSON,
        json.dumps({"humanId": "h 1;", "clientId": CLIENT_ID, "sessionToken": "a"}).encode(),
        400,
        "humanId",
    ),
    (
        "too long",
        JSON,
        json.dumps({"humanId": "h" * 129, "clientId": CLIENT_ID, "sessionToken": "a"}).encode(),
        400,
        "humanId",
    ),
    (
        "null token",
        JSON,
        json.dumps({"humanId": "h", "clientId": CLIENT_ID, "sessionToken": None}).encode(),
        400,
        "sessionToken",
    ),
    ("form body", {"Content-Type": "application/x-www-form-urlencoded"}, b"humanId=x", 415, None),
    ("no content type", {}, json.dumps(factories.finish_body()).encode(), 415, None),
    (
        "other app",
        JSON,
        json.dumps(factories.finish_body(clientId="f" * 40)).encode(),
        422,
        "clientId",
    ),
    ("too big", JSON, b'{"humanId": "' + b"x" * 17000 + b'"}', 413, None),
    ("too big and not json", {"Content-Type": "text/plain"}, b"x" * 20000, 413, None),
    ("wrong type and bad json", {"Content-Type": "text/plain"}, b"{nope", 415, None),
    ("bad json beats other app", JSON, b'{"clientId": "ffff"', 400, None),
]


@pytest.mark.parametrize(("what", "headers", "raw", "code", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_nothing_enqueued(
    client: TestClient,
    redis_client: redis.Redis,
    what: str,
    headers: dict,
    raw: bytes,
    code: int,
    field: str | None,
) -> None:
    """Each malformed body gets its status and a JSON error, and nothing reaches Redis."""
    resp = client.post("/connect/finish", content=raw, headers=headers)
    assert resp.status_code == code, resp.text
    body = resp.json()
    assert isinstance(body["error"], str) and isinstance(body["fields"], dict)
    if field:
        assert field in body["fields"]
    assert nothing_written(redis_client)


def test_same_session_posted_concurrently_is_queued_once(
    client: TestClient, redis_client: redis.Redis
) -> None:
    """Five concurrent posts of one session: one message, one requestId for all."""
    body = factories.finish_body()
    results: list = []
    barrier = threading.Barrier(5)

    def post() -> None:
        barrier.wait()
        results.append(client.post("/connect/finish", json=body))

    threads = [threading.Thread(target=post) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [202] * 5
    assert len({r.json()["requestId"] for r in results}) == 1
    assert len(queued_messages(redis_client)) == 1


def test_same_session_other_human_conflicts(client: TestClient, redis_client: redis.Redis) -> None:
    """The same sessionToken with a different humanId gets 409 and queues nothing more."""
    body = factories.finish_body()
    assert client.post("/connect/finish", json=body).status_code == 202
    resp = client.post("/connect/finish", json={**body, "humanId": factories.human_id()})
    assert resp.status_code == 409
    assert len(queued_messages(redis_client)) == 1


def test_unknown_request_id_is_404(client: TestClient) -> None:
    """A status URL nobody was given is 404, whatever its shape."""
    assert client.get("/connect/finish/" + "A" * 22).status_code == 404
    assert client.get("/connect/finish/..%2F..").status_code == 404


def test_openapi_documents_the_finish_body(client: TestClient) -> None:
    """/openapi.json describes POST /connect/finish with its three fields."""
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["components"]["schemas"]["FinishBody"]["required"]) == {
        "humanId",
        "clientId",
        "sessionToken",
    }


def test_redis_down_answers_503_fast_then_recovers(
    make_settings: Callable[..., Settings], sqlite_url: str, own_redis: RedisServer
) -> None:
    """With Redis gone a finish gets 503 + Retry-After, the web waiting for Redis less than the
    contract's 2 s; when it's back, 202."""
    from producer.accept import ACCEPT_DEADLINE_S
    from producer.app import create_app

    settings = make_settings(DATABASE_URL=sqlite_url, REDIS_URL=own_redis.url)
    with TestClient(create_app(settings)) as c:
        assert c.post("/connect/finish", json=factories.finish_body()).status_code == 202
        own_redis.kill()
        resp, took = timed(lambda: c.post("/connect/finish", json=factories.finish_body()))
        assert resp.status_code == 503
        assert resp.headers["Retry-After"]
        # "Within 2 s" is the web's deadline on the accept call, not this machine's speed:
        # the deadline is under it, and the measure only tells a hang.
        assert ACCEPT_DEADLINE_S < 2
        assert took < HANG_GUARD * 2, f"hung: {took:.1f} s"
        own_redis.start()
        body = factories.finish_body()
        resp = c.post("/connect/finish", json=body)
        assert resp.status_code == 202
        r = redis.Redis.from_url(own_redis.url)
        # Only the message accepted after the restart is there (this Redis keeps nothing).
        assert r.llen(QUEUE) == 1
