"""Webhooks as an operator meets them: the `humanconnect webhooks` commands, the example
receiver, the metrics, TLS that does not verify and credentials in a URL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from humanconnect.clock import now
from humanconnect.runtime import Runtime
from humanconnect.webhooks import signing
from humanconnect.webhooks.sender import Sender, safe_url
from tests.support.hooks import SECRET, completed, dispatcher
from tests.support.receiver import Receiver

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
    monkeypatch.setenv("HUMANCONNECT_WEBHOOK_TIMEOUT_S", "5")
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
