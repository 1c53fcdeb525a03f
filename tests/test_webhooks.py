"""Webhooks, in process: the format, the schedule, and one endpoint's dispatcher against a
real receiver on a port, a real database and a real Redis. The deployment-wide guarantees
(every event delivered through faults, crashes) are in tests/test_webhooks_e2e.py."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook, WebhookVerificationError

from humanconnect import events
from humanconnect.clock import now
from humanconnect.errors import ConfigError
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings, load
from humanconnect.storage.models import WebhookDelivery
from humanconnect.webhooks import deliveries, signing
from humanconnect.webhooks.deliveries import Result, Targets
from humanconnect.webhooks.dispatch import Dispatcher
from humanconnect.webhooks.sender import Sender, safe_url
from tests import factories
from tests.support.receiver import Receiver

SECRET = signing.new_secret()
SCHEDULE = "0,0,0"


@pytest.fixture
def hooked(make_settings: Callable[..., Settings], db_url: str, receiver: Receiver) -> Runtime:
    """A runtime whose events go to `receiver`, three attempts with no wait between them."""
    return Runtime(
        make_settings(
            DATABASE_URL=db_url,
            HUMANCONNECT_WEBHOOK_URLS=receiver.url,
            HUMANCONNECT_WEBHOOK_SECRET=SECRET,
            HUMANCONNECT_WEBHOOK_TIMEOUT_S="0.5",
            HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE=SCHEDULE,
        )
    )


def dispatcher(rt: Runtime, endpoint: str | None = None, concurrency: int = 4) -> Dispatcher:
    return Dispatcher(
        rt,
        endpoint or rt.settings.webhook_urls[0],
        Sender(rt.settings.webhook_timeout_s),
        signing.Signer.from_secret(SECRET),
        ThreadPoolExecutor(concurrency),
        concurrency,
    )


def completed(rt: Runtime, n: int = 1) -> list[str]:
    """Commit `n` connect.completed events as the exchange does; their eventIds."""
    ids = []
    with rt.db() as db:
        for _ in range(n):
            event = events.record(
                db,
                "connect.completed",
                targets=rt.webhook_targets,
                humanId=factories.human_id(),
                clientUserId="user-1",
                requestId="req-1",
            )
            ids.append(event.event_id)
        db.commit()
    return ids


def rows(rt: Runtime) -> list[WebhookDelivery]:
    with rt.db() as db:
        return list(db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all())


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
    assert dispatcher(hooked).run() == {"retrying": 1}
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
    receiver.delay_s = 0.3
    d1, d2 = dispatcher(hooked), dispatcher(hooked)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(d1.run)
        time.sleep(0.1)
        second = pool.submit(d2.run)
        assert second.result() == {}
        assert first.result() == {"delivered": 8}
    assert len(receiver.received) == 8


def test_a_lapsed_claim_is_sent_again(hooked: Runtime, receiver: Receiver) -> None:
    """A dispatcher that died after claiming: its deliveries come back when the lease ends."""
    [event_id] = completed(hooked)
    with hooked.db() as db:
        [due] = deliveries.claim(db, hooked.settings.webhook_urls[0], limit=10, lease_s=0.2)
    assert due.attempts == 1
    d = dispatcher(hooked)
    assert d.run() == {}
    time.sleep(0.25)
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


# -- the commands --------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from humanconnect.cli.main import main

    with pytest.raises(SystemExit) as ended:
        main(list(argv))
    return int(ended.value.code or 0), capsys.readouterr().out


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, hooked: Runtime, redis_url: str) -> Runtime:
    monkeypatch.setenv("DATABASE_URL", hooked.settings.database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_URLS", hooked.settings.webhook_urls[0])
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_TIMEOUT_S", "0.5")
    return hooked


def test_cli_secret_list_retry_and_test(
    cli_env: Runtime, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_cli(capsys, "webhooks", "secret")
    assert code == 0
    signing.check_secret(out.strip())

    receiver.status = 410
    [event_id] = completed(cli_env)
    assert dispatcher(cli_env).run() == {"failed": 1}
    code, out = run_cli(capsys, "webhooks", "list", "--failed")
    assert code == 0 and event_id in out and "failed" in out and "HTTP 410" in out
    assert SECRET not in out

    code, out = run_cli(capsys, "webhooks", "retry", "--failed", "--since", "1h")
    assert (code, out) == (0, "1 failed deliveries are due now, with a fresh schedule\n")
    code, out = run_cli(capsys, "webhooks", "retry", "--since", "2026-01-01T00:00")
    assert code == 0 and out.startswith("1 failed or pending")
    code, out = run_cli(capsys, "webhooks", "retry", "--since", "yesterday-ish")
    assert code == 2

    receiver.status = 200
    code, out = run_cli(capsys, "webhooks", "test", receiver.url)
    assert code == 0 and "HTTP 200" in out and "delivered" in out
    sent = receiver.received[-1]
    payload = Webhook(SECRET).verify(sent.body, sent.headers)
    assert payload["type"] == "webhook.test"
    assert payload["data"] == {"eventId": sent.headers["webhook-id"]}

    receiver.status = 500
    code, out = run_cli(capsys, "webhooks", "test", receiver.url)
    assert code == 1 and "not delivered (HTTP 500)" in out and "answer: no" in out


# -- the receiver to copy ------------------------------------------------------------------


def test_the_example_receiver_verifies_refuses_stale_and_dedupes() -> None:
    import http.server
    import importlib.util
    import io
    import threading
    from datetime import timedelta

    import httpx

    from humanconnect.cli.procs import free_port
    from tests.support.env import ROOT

    spec = importlib.util.spec_from_file_location(
        "webhook_receiver", ROOT / "examples" / "webhook_receiver.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    Seen, handler = example.Seen, example.handler

    out = io.StringIO()
    port = free_port()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), handler(Webhook(SECRET), Seen(), out)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{port}/hooks"
    signer = signing.Signer.from_secret(SECRET)
    body = signing.body(
        {"type": "connect.failed", "eventId": "e-9", "occurredAt": "2026-11-28T20:00:00+00:00"}
    )
    try:
        fresh = signer.headers("e-9", body, now())
        assert httpx.post(url, content=body, headers=fresh).status_code == 204
        assert httpx.post(url, content=body, headers=fresh).status_code == 204  # a resend
        stale = signer.headers("e-9", body, now() - timedelta(minutes=6))
        answer = httpx.post(url, content=body, headers=stale)
        assert (answer.status_code, answer.text) == (400, "rejected: Message timestamp too old")
        forged = signing.Signer.from_secret(signing.new_secret()).headers("e-9", body, now())
        assert httpx.post(url, content=body, headers=forged).status_code == 400
    finally:
        server.shutdown()
        server.server_close()
    # Printed once, though delivered twice.
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"webhookId": "e-9", "type": "connect.failed", "data": {"eventId": "e-9"}}
    ]


# -- what operators see, and TLS -------------------------------------------------------------


def test_metrics_show_attempts_latency_and_each_endpoints_backlog(
    hooked: Runtime, receiver: Receiver, redis_client: object
) -> None:
    from fastapi.testclient import TestClient

    from producer.app import create_app

    completed(hooked, 3)
    receiver.status = 500
    dispatcher(hooked).run()
    receiver.status = 200
    completed(hooked, 2)
    with TestClient(create_app(hooked.settings)) as web:
        text = web.get("/metrics").text
    shown = safe_url(hooked.settings.webhook_urls[0])
    assert f'humanconnect_webhook_backlog{{endpoint="{shown}"}} 5.0' in text
    assert 'humanconnect_webhook_attempts_total{outcome="retrying"} 3.0' in text
    dispatcher(hooked).run()
    with TestClient(create_app(hooked.settings)) as web:
        text = web.get("/metrics").text
    assert f'humanconnect_webhook_backlog{{endpoint="{shown}"}} 0.0' in text
    assert 'humanconnect_webhook_attempts_total{outcome="delivered"} 5.0' in text
    assert "humanconnect_webhook_delivery_seconds_count 5.0" in text
    assert SECRET not in text


def test_a_certificate_that_does_not_verify_is_a_failed_attempt(tmp_path: Path) -> None:
    """TLS is verified: a receiver with a self-signed certificate is never sent the body."""
    import datetime as dt
    import http.server
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from humanconnect.cli.procs import free_port

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    stamp = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(stamp - dt.timedelta(days=1))
        .not_valid_after(stamp + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    bodies: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            bodies.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = Sender(2.0).send(f"https://127.0.0.1:{port}/hooks", "{}", {"webhook-id": "x"})
    finally:
        server.shutdown()
        server.server_close()
    assert (result.delivered, result.error) == (False, "TLS verification failed")
    assert bodies == []


def test_credentials_in_the_url_are_sent_as_basic_auth(receiver: Receiver) -> None:
    import base64

    url = receiver.url.replace("http://", "http://hook-user:p%40ss@") + "?tag=1"
    result = Sender(2.0).send(url, "{}", {"webhook-id": "x"})
    assert result.delivered
    [got] = receiver.received
    assert got.headers["authorization"] == "Basic " + base64.b64encode(b"hook-user:p@ss").decode()
    assert safe_url(url) == receiver.url + "?…"
