"""A finished request's status record leaves Redis after HUMANCONNECT_FINISHED_STATUS_TTL_S
while its session's claim stays: the status, a duplicate finish and the reconciler all answer
correctly once the record is gone (real Redis, SQLite/PostgreSQL, the stand-in; no Celery)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from humanconnect import redis_keys, status_records
from humanconnect.clock import now
from humanconnect.crypto import session_hash
from humanconnect.exchange import Exchanger
from humanconnect.jobs import retention
from humanconnect.jobs.reconcile import requeue_stale
from humanconnect.request import ExchangeRequest, Job
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.settings import Settings
from humanconnect.states import RequestState
from tests import factories

FINISHED_TTL_S = 1234
STATUS_TTL_S = 2 * 86400

Deployed = tuple[TestClient, Runtime]


@pytest.fixture
def deployed(
    make_settings: Callable[..., Settings], db_url: str, standin: Running
) -> Iterator[Deployed]:
    """The web in process and an exchanger (the worker's logic), on one Redis and database."""
    from producer.app import create_app

    settings = make_settings(
        DATABASE_URL=db_url,
        HUMANAPI_BASE_URL=standin.url,
        HUMANCONNECT_FINISHED_STATUS_TTL_S=str(FINISHED_TTL_S),
        HUMANCONNECT_STATUS_TTL_S=str(STATUS_TTL_S),
    )
    with TestClient(create_app(settings)) as client:
        yield client, Runtime(settings)


def finish_and_exchange(d: Deployed, body: dict[str, str]) -> str:
    """POST the finish, run its exchange as a worker would; the requestId."""
    client, rt = d
    resp = client.post("/connect/finish", json=body)
    assert resp.status_code == 202, resp.text
    request_id = str(resp.json()["requestId"])
    job = factories.job(
        request_id=request_id, human_id=body["humanId"], session_token=body["sessionToken"]
    )
    exchanger = Exchanger(rt, factories.free_slot)
    exchanger.run(job)
    exchanger.announce.sent.flush()  # its relayed mark, before the test's database goes
    return request_id


def claim_key(body: dict[str, str]) -> str:
    return redis_keys.session_claim(session_hash(body["sessionToken"]))


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_a_finished_record_expires_sooner_than_the_claim(
    deployed: Deployed, standin: Running, redis_client: redis.Redis, outcome: str
) -> None:
    """Once a request ends its status record's TTL is the finished one; the session's claim
    keeps the full status TTL, holds no JSON, and says how the request ended."""
    if outcome == "failed":
        standin.state.faults = Faults(refuse_status=400)
    body = factories.finish_body()
    request_id = finish_and_exchange(deployed, body)

    record_ttl = redis_client.ttl(redis_keys.request_status(request_id))
    claim_ttl = redis_client.ttl(claim_key(body))
    assert 0 < record_ttl <= FINISHED_TTL_S
    assert FINISHED_TTL_S < claim_ttl <= STATUS_TTL_S
    claim = redis_client.get(claim_key(body))
    expected = f"{status_records.claim_value(request_id, body['humanId'])} {outcome[0]}"
    assert isinstance(claim, bytes) and claim.decode() == expected


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_the_status_is_answered_from_the_database_once_the_record_is_gone(
    deployed: Deployed, standin: Running, redis_client: redis.Redis, outcome: str
) -> None:
    """`GET /connect/finish/{id}` gives the same body, never an accessToken, after the
    record expired (deleted here, as its TTL would)."""
    if outcome == "failed":
        standin.state.faults = Faults(refuse_status=400)
    client, _ = deployed
    body = factories.finish_body()
    request_id = finish_and_exchange(deployed, body)
    from_redis = client.get(f"/connect/finish/{request_id}")
    assert from_redis.status_code == 200 and from_redis.json()["status"] == outcome

    assert redis_client.delete(redis_keys.request_status(request_id)) == 1
    from_db = client.get(f"/connect/finish/{request_id}")

    assert from_db.status_code == 200
    assert from_db.json() == from_redis.json()
    assert "accessToken" not in from_db.text
    if outcome == "succeeded":
        issued = standin.state.by_human[body["humanId"]]
        assert issued.access_token not in from_db.text
        assert from_db.json()["publicToken"] == issued.public_token


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
@pytest.mark.parametrize("claim", ["marked", "from before marks"])
def test_a_duplicate_after_the_record_expired_gets_the_real_state(
    deployed: Deployed,
    standin: Running,
    redis_client: redis.Redis,
    outcome: str,
    claim: str,
) -> None:
    """A finish sent again after its request ended and its record expired is answered with
    the request's final state (from its claim's mark, or the database for a claim written
    before marks), never `queued`; with `Prefer: wait`, 201 or 422 with the stored status."""
    if outcome == "failed":
        standin.state.faults = Faults(refuse_status=400)
    client, _ = deployed
    body = factories.finish_body()
    request_id = finish_and_exchange(deployed, body)
    redis_client.delete(redis_keys.request_status(request_id))
    if claim == "from before marks":
        legacy = f'{{"requestId": "{request_id}", "humanId": "{body["humanId"]}"}}'
        redis_client.set(claim_key(body), legacy, keepttl=True)

    again = client.post("/connect/finish", json=body)
    waited = client.post("/connect/finish", json=body, headers={"Prefer": "wait=5"})

    assert again.status_code == 202
    assert again.json()["requestId"] == request_id and again.json()["status"] == outcome
    assert waited.status_code == (201 if outcome == "succeeded" else 422)
    assert waited.json()["status"] == outcome and waited.json()["requestId"] == request_id
    assert "accessToken" not in waited.text
    # Nothing more queued for it (the first finish's message is still there: the exchange
    # ran without a worker taking it): a duplicate, not a new request.
    assert redis_client.llen(redis_keys.QUEUE) + redis_client.llen(redis_keys.WAITING_QUEUE) == 1


def test_a_duplicate_after_retention_is_answered_from_the_claim(
    deployed: Deployed, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the record expired and the session deleted by retention, the claim's mark still
    answers a duplicate `succeeded`; a duplicate under another humanId is still refused."""
    client, rt = deployed
    body = factories.finish_body()
    request_id = finish_and_exchange(deployed, body)
    redis_client.delete(redis_keys.request_status(request_id))
    # Retention runs a day after the session passed HUMANCONNECT_RETENTION_S.
    later = now() + timedelta(seconds=rt.settings.retention_s + 86400)
    monkeypatch.setattr(retention, "now", lambda: later)
    assert retention.purge(rt).sessions == 1

    again = client.post("/connect/finish", json=body)
    other = client.post("/connect/finish", json={**body, "humanId": factories.human_id()})

    assert again.status_code == 202 and again.json()["status"] == "succeeded"
    assert client.get(f"/connect/finish/{request_id}").status_code == 404
    assert other.status_code == 409


def test_the_reconciler_drops_a_finished_request_whose_record_expired(
    deployed: Deployed, redis_client: redis.Redis
) -> None:
    """A pending entry left for a finished request whose record is gone is dropped, never
    re-sent."""
    client, rt = deployed
    request_id = finish_and_exchange(deployed, factories.finish_body())
    redis_client.delete(redis_keys.request_status(request_id))
    redis_client.zadd(redis_keys.PENDING, {request_id: 1.0})
    sent: list[ExchangeRequest] = []

    assert requeue_stale(redis_client, sent.append, stale_s=0) == 0

    assert sent == [] and redis_client.zscore(redis_keys.PENDING, request_id) is None


def test_a_duplicate_delivery_after_expiry_leaves_a_finished_record(
    deployed: Deployed, standin: Running, redis_client: redis.Redis
) -> None:
    """A message delivered again after the record expired finds the session done: no second
    exchange, and the record it writes back is final with the finished TTL."""
    _, rt = deployed
    body = factories.finish_body()
    request_id = finish_and_exchange(deployed, body)
    redis_client.delete(redis_keys.request_status(request_id))
    job: Job = factories.job(
        request_id=request_id, human_id=body["humanId"], session_token=body["sessionToken"]
    )

    exchanger = Exchanger(rt, factories.free_slot)
    outcome: Any = exchanger.run(job)
    exchanger.announce.sent.flush()

    assert outcome.state == "succeeded" and outcome.upstream_calls == 0
    assert sum(standin.state.exchanges.values()) == 1
    record = status_records.get_state(redis_client, request_id)
    assert record is not None and record["state"] == "succeeded"
    assert 0 < redis_client.ttl(redis_keys.request_status(request_id)) <= FINISHED_TTL_S


def test_only_the_request_s_own_claim_is_marked(redis_client: redis.Redis) -> None:
    """The worker's mark lands on a claim naming its request, keeping the claim's TTL, and
    leaves alone a claim another request made since and a JSON claim from before marks."""
    ours, theirs, legacy = "hc:session:ours", "hc:session:theirs", "hc:session:legacy"
    redis_client.set(ours, status_records.claim_value("rid-1", "h1"), ex=STATUS_TTL_S)
    redis_client.set(theirs, status_records.claim_value("rid-2", "h1"), ex=STATUS_TTL_S)
    redis_client.set(legacy, '{"requestId": "rid-1", "humanId": "h1"}', ex=STATUS_TTL_S)

    pipe = redis_client.pipeline(transaction=False)
    for key in (ours, theirs, legacy):
        status_records.queue_mark_claim(pipe, key, "rid-1", RequestState.FAILED)
    assert pipe.execute() == [1, 0, 0]

    marked = status_records.read_claim(redis_client.get(ours) or b"")
    assert marked.request_id == "rid-1" and marked.final is RequestState.FAILED
    assert marked.names("h1") and not marked.names("h2")
    assert FINISHED_TTL_S < redis_client.ttl(ours) <= STATUS_TTL_S
    assert status_records.read_claim(redis_client.get(theirs) or b"").final is None
    assert redis_client.get(legacy) == b'{"requestId": "rid-1", "humanId": "h1"}'
