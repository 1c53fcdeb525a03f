"""Webhooks, in process: the format, the schedule, and one endpoint's dispatcher against a
real receiver on a port, a real database and a real Redis. The deployment-wide guarantees
(every event delivered through faults, crashes) are in tests/chaos/test_webhook_delivery.py;
the commands, the example receiver, metrics and TLS in tests/test_webhooks_ops.py."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook, WebhookVerificationError

from humanconnect import events
from humanconnect.clock import now
from humanconnect.errors import ConfigError
from humanconnect.redis_keys import webhook_lock
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings, load
from humanconnect.storage.models import WebhookDelivery
from humanconnect.webhooks import deliveries, signing
from humanconnect.webhooks.deliveries import Result, Targets
from humanconnect.webhooks.sender import safe_url
from tests.support.env import wait_for
from tests.support.hooks import SECRET, completed, dispatcher, rows
from tests.support.receiver import Receiver

# -- the format --------------------------------------------------------------------------


def test_a_new_secret_is_valid_and_a_bad_one_is_named_not_echoed() -> None:
    secret = signing.new_secret()
    signing.check_secret(secret)
    assert secret != signing.new_secret()
    for bad, says in [
        ("abc", "must start with whsec_"),
        ("whsec_!!!", "base64"),
        ("whsec_" + "QUJD", "24-64 bytes, not 3"),
    ]:
        with pytest.raises(ValueError, match=says) as caught:
            signing.check_secret(bad)
        assert bad not in str(caught.value) or bad == "abc"


def test_settings_refuse_urls_without_a_secret_and_name_no_url(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="HUMANCONNECT_WEBHOOK_SECRET is required"):
        make_settings(HUMANCONNECT_WEBHOOK_URLS="https://a.example/h")
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_URLS", "https://a.example/h,ftp://u:pw@b.example/")
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_SECRET", SECRET)
    with pytest.raises(ConfigError) as caught:
        load()
    # The one line a process stops with names the variable and the place, not the URL.
    assert str(caught.value) == (
        "HUMANCONNECT_WEBHOOK_URLS: Value error, URL number 2 is not an http(s) URL"
    )
    for schedule in ("0,5,soon", "0,-5", "0,inf", "0,nan"):
        with pytest.raises(ValidationError, match="seconds"):
            make_settings(HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE=schedule)
    s = make_settings(
        HUMANCONNECT_WEBHOOK_URLS=" https://a.example/h , https://a.example/h,http://b:9/x",
        HUMANCONNECT_WEBHOOK_SECRET=SECRET,
    )
    assert s.webhook_urls == ["https://a.example/h", "http://b:9/x"]
    assert s.webhook_retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


def test_the_body_is_the_event_and_the_signature_verifies_with_standardwebhooks() -> None:
    fields = {
        "type": "connect.completed",
        "eventId": "e-1",
        "occurredAt": "2026-11-28T20:00:00+00:00",
        "humanId": "h",
        "clientUserId": "u",
        "requestId": "r",
    }
    body = signing.body(fields)
    assert json.loads(body) == {
        "type": "connect.completed",
        "timestamp": "2026-11-28T20:00:00+00:00",
        "data": {"eventId": "e-1", "humanId": "h", "clientUserId": "u", "requestId": "r"},
    }
    at = now()
    headers = signing.Signer.from_secret(SECRET).headers("e-1", body, at)
    assert headers["webhook-id"] == "e-1"
    assert headers["webhook-timestamp"] == str(int(at.timestamp()))
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace('"h"', '"x"'), headers)


def test_the_schedule_is_jittered_within_a_tenth_and_ends() -> None:
    rng = random.Random(3)
    schedule = (0.0, 5.0, 300.0)
    waits = [deliveries.next_wait(schedule, 1, rng) for _ in range(200)]
    assert all(w is not None and 4.5 <= w <= 5.5 for w in waits)
    assert len({round(w or 0, 3) for w in waits}) > 100
    assert deliveries.next_wait(schedule, 0, rng) == 0.0
    assert deliveries.next_wait(schedule, 3, rng) is None


def test_safe_url_drops_credentials() -> None:
    assert safe_url("https://u:pw@h.example:8443/a/b?token=s") == "https://h.example:8443/a/b?…"
    assert safe_url("http://h/x") == "http://h/x"


# -- one endpoint's dispatcher -------------------------------------------------------------


def test_an_event_committed_has_its_delivery_and_one_rolled_back_has_none(
    hooked: Runtime,
) -> None:
    completed(hooked)
    with hooked.db() as db:
        events.record(
            db, "connect.failed", targets=hooked.webhook_targets, humanId="h", requestId="r"
        )
        db.rollback()
    [row] = rows(hooked)
    assert (row.state, row.attempts, row.endpoint) == (
        "pending",
        0,
        hooked.settings.webhook_urls[0],
    )


def test_delivered_signed_once_each(hooked: Runtime, receiver: Receiver) -> None:
    ids = completed(hooked, 40)
    counts = dispatcher(hooked).run()
    assert counts == {"delivered": 40}
    assert receiver.delivered_ids() == set(ids)
    assert len(receiver.received) == 40
    for got in receiver.received:
        payload = Webhook(SECRET).verify(got.body, got.headers)
        assert payload["data"]["eventId"] == got.headers["webhook-id"]
        assert got.headers["content-type"] == "application/json"
    assert {r.state for r in rows(hooked)} == {"delivered"}
    assert {r.last_response for r in rows(hooked)} == {"ok"}
    # Nothing is due: another run sends nothing.
    assert dispatcher(hooked).run() == {}


def test_a_failing_receiver_is_retried_then_failed_and_410_fails_at_once(
    hooked: Runtime, receiver: Receiver
) -> None:
    [event_id] = completed(hooked)
    receiver.status = 500
    d = dispatcher(hooked)
    for attempt in (1, 2, 3):
        assert d.run() == ({"retrying": 1} if attempt < 3 else {"failed": 1})
        [row] = rows(hooked)
        assert (row.attempts, row.last_status, row.last_error) == (attempt, 500, "HTTP 500")
    assert row.state == "failed" and row.last_response == "no"
    assert len(receiver.received) == 3
    assert {r.headers["webhook-id"] for r in receiver.received} == {event_id}
    # Each attempt is signed over its own timestamp header: every one verifies.
    for got in receiver.received:
        Webhook(SECRET).verify(got.body, got.headers)

    receiver.status = 410
    completed(hooked)
    assert d.run() == {"failed": 1}
    gone = rows(hooked)[-1]
    assert (gone.state, gone.attempts, gone.last_status) == ("failed", 1, 410)


def test_a_redirect_is_not_followed_and_a_hang_times_out(
    hooked: Runtime, receiver: Receiver
) -> None:
    elsewhere = Receiver().start()
    try:
        receiver.status, receiver.location = 302, elsewhere.url
        completed(hooked)
        assert dispatcher(hooked).run() == {"retrying": 1}
        [row] = rows(hooked)
        assert row.last_error == "redirect not followed (HTTP 302)"
        assert elsewhere.received == []
    finally:
        elsewhere.stop()
    receiver.status, receiver.delay_s = 200, 2.0
    assert dispatcher(hooked, timeout_s=0.5).run() == {"retrying": 1}
    [row] = rows(hooked)
    assert (row.attempts, row.last_error, row.last_status) == (2, "timeout", None)


def test_a_receiver_that_is_down_is_retried_and_its_dispatcher_stops_early(
    hooked: Runtime, receiver: Receiver
) -> None:
    completed(hooked, 100)
    receiver.down()
    d = dispatcher(hooked, concurrency=4)
    # One batch (16 per slot of concurrency), all refused: the run ends there instead of
    # trying the other 36.
    assert d.batch == 64
    assert d.run() == {"retrying": 64}
    assert {r.last_error for r in rows(hooked) if r.attempts} == {"connection refused"}
    receiver.start()
    assert d.run() == {"delivered": 100}


def test_one_dispatcher_per_endpoint_at_a_time(hooked: Runtime, receiver: Receiver) -> None:
    completed(hooked, 8)
    receiver.delay_s = 0.5
    d1, d2 = dispatcher(hooked), dispatcher(hooked)
    lock = webhook_lock(deliveries.endpoint_digest(hooked.settings.webhook_urls[0]))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(d1.run)
        # The second starts once the first holds the endpoint's lock (its deliveries take
        # two rounds of 0.5 s).
        wait_for(lambda: hooked.redis.exists(lock), 10, interval=0.01, what="d1's lock")
        second = pool.submit(d2.run)
        assert second.result() == {}
        assert first.result() == {"delivered": 8}
    assert len(receiver.received) == 8


def test_a_lapsed_claim_is_sent_again(hooked: Runtime, receiver: Receiver) -> None:
    """A dispatcher that died after claiming: its deliveries come back when the lease ends."""
    [event_id] = completed(hooked)
    with hooked.db() as db:
        [due] = deliveries.claim(db, hooked.settings.webhook_urls[0], limit=10, lease_s=2)
    assert due.attempts == 1
    d = dispatcher(hooked)
    assert d.run() == {}
    time.sleep(2.1)
    assert d.run() == {"delivered": 1}
    assert receiver.delivered_ids() == {event_id}
    [row] = rows(hooked)
    assert row.attempts == 2


def test_retry_makes_failed_deliveries_due_with_a_fresh_schedule(
    hooked: Runtime, receiver: Receiver
) -> None:
    receiver.status = 410
    completed(hooked, 3)
    assert dispatcher(hooked).run() == {"failed": 3}
    receiver.status = 200
    with hooked.db() as db:
        assert deliveries.retry(db, failed_only=True) == 3
    assert dispatcher(hooked).run() == {"delivered": 3}
    with hooked.db() as db:
        assert deliveries.backlog(db) == {}
        listed = deliveries.listing(db)
    assert [x.state for x in listed] == ["delivered"] * 3
    assert {x.type for x in listed} == {"connect.completed"}


def test_settle_records_each_outcome(hooked: Runtime) -> None:
    completed(hooked, 3)
    endpoint = hooked.settings.webhook_urls[0]
    with hooked.db() as db:
        due = deliveries.claim(db, endpoint, limit=10, lease_s=30)
        counts = deliveries.settle(
            db,
            zip(
                due,
                [
                    Result(True, 204),
                    Result(False, 503, "HTTP 503", "x" * 500),
                    Result(False, None, "timeout"),
                ],
                strict=True,
            ),
            (0.0, 0.0),
        )
    assert counts == {"delivered": 1, "retrying": 2}
    got = rows(hooked)
    assert [r.state for r in got] == ["delivered", "pending", "pending"]
    assert got[1].last_response == "x" * 200
    assert got[0].finished_at is not None and got[1].finished_at is None


def test_no_endpoints_no_deliveries(runtime: Runtime) -> None:
    assert runtime.webhook_targets == Targets()
    with runtime.db() as db:
        events.record(db, "connect.failed", targets=runtime.webhook_targets, humanId="h")
        db.commit()
        assert db.scalars(select(WebhookDelivery)).all() == []
