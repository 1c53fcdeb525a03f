"""End to end through real processes: uvicorn `web`, a `celery` worker, Redis, the stand-in."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import select

from humanconnect.crypto import Cipher
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.storage.db import session_factory
from humanconnect.storage.models import SessionRecord
from tests import factories
from tests.support.env import BIN, CLIENT_ID, CLIENT_SECRET, FERNET_KEY, ROOT, service_env, wait_for
from tests.support.scan import (
    assert_no_secrets,
    largest_batch,
    state_counts,
    stored_users,
    stream_entries,
)
from tests.support.traffic import burst


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 16])
def test_burst_with_upstream_faults_stores_everyone_once(
    deploy, standin: Running, redis_client: redis.Redis, batch: int
) -> None:
    """300 sessions against 20 % 503, 10 % 429, 5 % drops: all stored, right tokens, no double
    (with `batch` 16, first tries run sixteen at a time, their next tries alone)."""
    # Given an upstream that fails a third of its calls
    standin.state.faults = Faults(p503=0.20, p429=0.10, pdrop=0.05, retry_after_s=0.2, latency_ms=5)
    d = deploy(HUMANCONNECT_EXCHANGE_BATCH=str(batch))
    bodies = [factories.finish_body() for _ in range(300)]
    # When 300 users finish at once
    responses = burst(d.url, bodies)
    # Then every one is accepted at once ...
    assert [r.status_code for r in responses] == [202] * 300
    # ... and ends stored with exactly the tokens the upstream issued, exchanged once each.
    wait_for(
        lambda: state_counts(d.db_url).get("succeeded") == 300,
        240,
        interval=0.5,
        what="300 succeeded sessions",
    )
    assert state_counts(d.db_url) == {"succeeded": 300}
    assert standin.state.exchanges.total() == 300
    assert max(standin.state.exchanges.values()) == 1
    faults = {
        k: v for k, v in standin.state.calls.items() if k.split(":")[1] in ("503", "429", "drop")
    }
    assert sum(faults.values()) > 50, faults
    users = stored_users(d.db_url)
    assert len(users) == 300
    for body in bodies:
        issued = standin.state.by_human[body["humanId"]]
        user = users[body["humanId"]]
        assert (user.access_token, user.public_token, user.client_user_id) == (
            issued.access_token,
            issued.public_token,
            issued.client_user_id,
        )
    # And each status URL says so, with the publicToken and never the accessToken.
    for resp, body in list(zip(responses, bodies, strict=True))[:20]:
        status = httpx.get(d.url + resp.headers["Location"]).json()
        assert status["status"] == "succeeded"
        assert status["publicToken"] == standin.state.by_human[body["humanId"]].public_token
        assert users[body["humanId"]].access_token not in str(status)
    # Exactly one connect.completed per user, each matching a stored user.
    entries = wait_for(
        lambda: (e := completed_events(redis_client)) and len(e) >= 300 and e,
        30,
        what="300 completion events",
    )
    assert len(entries) == 300
    assert len({e["eventId"] for e in entries}) == 300
    assert {(e["humanId"], e["clientUserId"]) for e in entries} == {
        (h, u.client_user_id) for h, u in users.items()
    }
    # No secret anywhere: the secret and access tokens in Redis, logs and the database; the
    # publicTokens and session tokens too in logs, metrics and events.
    access = [u.access_token for u in users.values()]
    public = [u.public_token or "" for u in users.values()]
    sessions = [b["sessionToken"] for b in bodies]
    for log in d.logs:
        text_ = log.read_text(errors="replace")
        assert "ready." in text_ or "Uvicorn running" in text_ or "Started server" in text_
    assert_no_secrets(
        [CLIENT_SECRET, *access], redis_client=redis_client, db_url=d.db_url, files=d.logs
    )
    metrics = httpx.get(d.url + "/metrics").text
    assert "humanconnect_exchanges_total" in metrics
    assert_no_secrets(
        [CLIENT_SECRET, *access, *public, *sessions],
        files=d.logs,
        texts={"metrics": metrics, "events": str(completed_events(redis_client))},
    )
    assert (largest_batch(d.logs) > 1) is (batch > 1)


def completed_events(r: redis.Redis) -> list[dict[str, str]]:
    return [e for e in stream_entries(r) if e["type"] == "connect.completed"]


def test_five_concurrent_posts_of_one_session_exchange_once(deploy, standin: Running) -> None:
    """The same session token posted 5 times at once: one upstream exchange, one stored set."""
    d = deploy()
    body = factories.finish_body()
    responses = burst(d.url, [body] * 5, concurrency=5)
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["requestId"] for r in responses}) == 1
    status_url = f"{d.url}/connect/finish/{responses[0].json()['requestId']}"
    # The status record, not the table: the worker stores first and says so in Redis after.
    wait_for(
        lambda: httpx.get(status_url).json()["status"] == "succeeded",
        30,
        what="the session to succeed",
    )
    # A late duplicate is answered from the record, no second exchange.
    again = httpx.post(d.url + "/connect/finish", json=body)
    assert again.status_code == 202 and again.json()["status"] == "succeeded"
    assert standin.state.exchanges.total() == 1
    assert standin.state.calls["tokens:used"] == 0
    assert len(stored_users(d.db_url)) == 1


def test_permanent_refusal_is_failed_with_a_reason(deploy, standin: Running) -> None:
    """An upstream 401 ends `failed` with a reason after one call, no endless retry."""
    standin.state.faults = Faults(refuse_status=401)
    d = deploy()
    resp = httpx.post(d.url + "/connect/finish", json=factories.finish_body())
    assert resp.status_code == 202
    url = d.url + resp.headers["Location"]
    final = wait_for(
        lambda: (s := httpx.get(url).json())["status"] == "failed" and s, 30, what="failed status"
    )
    assert "401" in final["error"]
    assert standin.state.calls["tokens:401"] == 1
    with session_factory(d.db_url)() as db:
        row = db.scalar(select(SessionRecord))
        assert row is not None and row.state == "failed" and row.attempts == 1


def test_two_sessions_of_one_user_in_reverse_order_keep_the_newer(deploy, standin: Running) -> None:
    """The older session's exchange finishing last does not overwrite the newer tokens."""
    # Given the first session's exchange is held up by a 429 asking for 2 s
    standin.state.faults = Faults(p429=1.0, retry_after_s=2)
    d = deploy()
    human = factories.human_id()
    older, newer = factories.finish_body(humanId=human), factories.finish_body(humanId=human)
    assert httpx.post(d.url + "/connect/finish", json=older).status_code == 202
    wait_for(
        lambda: standin.state.calls["tokens:429"] >= 1, 10, what="the older session to be held"
    )
    # When the newer session arrives once the upstream is healthy, and finishes first
    standin.state.faults = Faults()
    assert httpx.post(d.url + "/connect/finish", json=newer).status_code == 202
    wait_for(lambda: state_counts(d.db_url).get("succeeded") == 2, 30, what="both sessions")
    order = [
        t for t in standin.state.by_session if t in (older["sessionToken"], newer["sessionToken"])
    ]
    assert order == [newer["sessionToken"], older["sessionToken"]], "the older must finish last"
    # Then the newer session's tokens are the stored ones
    user = stored_users(d.db_url)[human]
    assert user.access_token == standin.state.by_session[newer["sessionToken"]].access_token


def test_worker_refuses_to_start_without_a_required_variable(tmp_path: Path) -> None:
    """A worker with no REDIS_URL exits at once with one line naming it, no secret shown."""
    env = service_env(
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANAPI_CLIENT_SECRET=CLIENT_SECRET,
        HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY,
    )
    proc = subprocess.run(
        [str(BIN / "celery"), "-A", "worker", "worker"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "REDIS_URL" in proc.stderr
    assert CLIENT_SECRET not in proc.stderr + proc.stdout


def test_web_refuses_a_malformed_key_naming_it(tmp_path: Path, redis_url: str) -> None:
    """A web process with a malformed encryption key stops with one line, never the value."""
    env = service_env(
        REDIS_URL=redis_url,
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANCONNECT_ENCRYPTION_KEYS="not-a-key-value-xyz",
    )
    proc = subprocess.run(
        [str(BIN / "uvicorn"), "producer.main:app", "--factory"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "HUMANCONNECT_ENCRYPTION_KEYS" in lines[0]
    assert "not-a-key-value-xyz" not in proc.stderr


@pytest.mark.parametrize("batch", [1, 4])
def test_message_sealed_with_an_unknown_key_fails_visibly(
    deploy, redis_client: redis.Redis, batch: int
) -> None:
    """A session token sealed with a key no longer configured ends `failed`, not stuck queued
    (alone, or in a batch)."""

    from humanconnect.queue import EXCHANGE_TASK, sender
    from humanconnect.settings import Settings
    from humanconnect.status_records import get_state
    from tests.support.env import FERNET_KEY_2

    d = deploy(HUMANCONNECT_EXCHANGE_BATCH=str(batch))
    app = sender(Settings.model_validate({"REDIS_URL": d.env["REDIS_URL"]}), "test-sender")
    request_id = "unknownkeyrequest00001"
    app.send_task(
        EXCHANGE_TASK,
        kwargs={
            "request_id": request_id,
            "human_id": "h" * 24,
            "client_id": CLIENT_ID,
            "sealed_session_token": Cipher([FERNET_KEY_2]).seal("s" * 32),
            "received_us": 1,
        },
    )
    final = wait_for(
        lambda: (s := get_state(redis_client, request_id)) and s["state"] == "failed" and s,
        30,
        what="the failed status",
    )
    assert "encryption key" in final["error"]


@pytest.mark.slow
def test_failed_lists_and_retry_requeues_transient_failures(deploy, standin: Running) -> None:
    """`humanconnect failed` lists sessions the outage failed; `--retry` finishes them after."""
    # Given an upstream down for longer than a (short) retry window
    standin.state.faults = Faults(down=True)
    d = deploy(HUMANCONNECT_RETRY_WINDOW_S="2")
    bodies = [factories.finish_body() for _ in range(3)]
    assert {r.status_code for r in burst(d.url, bodies, concurrency=3)} == {202}
    wait_for(lambda: state_counts(d.db_url).get("failed") == 3, 30, what="3 transient failures")
    cli = [str(BIN / "humanconnect"), "failed"]
    listing = subprocess.run(cli, env=d.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "3 failed exchanges" in listing.stdout and listing.stdout.count("transient") == 3
    # When the upstream is back and an operator retries
    standin.state.faults = Faults()
    retry = subprocess.run(
        [*cli, "--retry"], env=d.env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert retry.returncode == 0 and "re-queued 3" in retry.stdout, retry.stdout + retry.stderr
    # Then all three are stored, and each has its failed and its completed event
    wait_for(lambda: state_counts(d.db_url).get("succeeded") == 3, 30, what="3 successes")
    assert len(stored_users(d.db_url)) == 3
    kinds = sorted(e["type"] for e in stream_entries(redis.Redis.from_url(d.env["REDIS_URL"])))
    assert kinds == ["connect.completed"] * 3 + ["connect.failed"] * 3


def test_json_logs_carry_the_request_id_into_the_worker(deploy, standin: Running) -> None:
    """With HUMANCONNECT_LOG_JSON=1 the worker's lines are JSON and carry the requestId."""
    import json

    d = deploy(HUMANCONNECT_LOG_JSON="1")
    resp = httpx.post(
        d.url + "/connect/finish", json=factories.finish_body(), headers={"Prefer": "wait=5"}
    )
    assert resp.status_code == 201
    request_id = resp.json()["requestId"]

    def our_lines() -> list[dict]:
        lines = []
        for line in d.worker.output().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return [rec for rec in lines if rec.get("requestId") == request_id]

    records = wait_for(our_lines, 10, what="JSON lines with the request id")
    assert any("exchange succeeded" in rec["message"] for rec in records)
