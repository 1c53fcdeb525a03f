"""Classifying the upstream's answers: what is retried and what is final."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from humanconnect.cli.procs import free_port
from humanconnect.clock import now
from humanconnect.errors import PermanentUpstreamError, TransientUpstreamError
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.upstream.client import (
    PUBLICTOKENS_PATH,
    Tokens,
    _proxies,
    _verify,
    exchange_tokens,
    http_session,
    parse_retry_after,
    post_json,
)
from tests.support.env import CLIENT_ID, CLIENT_SECRET


def call(base_url: str, read_timeout: float = 5.0) -> Tokens:
    return exchange_tokens(
        base_url,
        human_id="h" * 24,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        session_token="s" * 32,
        connect_timeout=1,
        read_timeout=read_timeout,
    )


@pytest.mark.parametrize("code", [408, 425, 429, 500, 502, 503, 504])
def test_transient_statuses(standin: Running, code: int) -> None:
    """Timeouts-by-status, throttling and 5xx are transient."""
    standin.state.faults = Faults(refuse_status=code)
    with pytest.raises(TransientUpstreamError) as info:
        call(standin.url)
    assert info.value.status == code and not info.value.ambiguous


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 422])
def test_permanent_statuses(standin: Running, code: int) -> None:
    """Any other 4xx is permanent."""
    standin.state.faults = Faults(refuse_status=code)
    with pytest.raises(PermanentUpstreamError):
        call(standin.url)


def test_retry_after_is_read(standin: Running) -> None:
    """A 429's Retry-After reaches the error."""
    standin.state.faults = Faults(p429=1.0, retry_after_s=7)
    with pytest.raises(TransientUpstreamError) as info:
        call(standin.url)
    assert info.value.retry_after == 7


def test_read_timeout_is_transient_and_ambiguous(standin: Running) -> None:
    """A hang past the read timeout may have reached the upstream: retried, flagged ambiguous."""
    standin.state.faults = Faults(phang=1.0, hang_s=2)
    with pytest.raises(TransientUpstreamError) as info:
        call(standin.url, read_timeout=0.3)
    assert info.value.ambiguous


def test_dropped_connection_is_transient() -> None:
    """Connection refused is transient and certainly never reached the upstream."""
    with pytest.raises(TransientUpstreamError) as info:
        call(f"http://127.0.0.1:{free_port()}")
    assert not info.value.ambiguous


class _Canned(BaseHTTPRequestHandler):
    status = 201
    payload: bytes = b""
    location = ""
    set_cookie = ""
    paths: list[str]
    cookies: list[str]

    def do_GET(self) -> None:  # a 301/302/303 would be followed with a GET
        self.paths.append("GET " + self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.payload)

    def do_POST(self) -> None:  # http.server's name
        self.paths.append(self.path)
        self.cookies.append(self.headers.get("Cookie", ""))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        # A redirect's target answers as a real tokens endpoint would.
        redirected = bool(self.location) and self.path != "/v1/connect/tokens"
        self.send_response(201 if redirected else self.status)
        if self.location and not redirected:
            self.send_header("Location", self.location)
        if self.set_cookie:
            self.send_header("Set-Cookie", self.set_cookie)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[tuple[str, type[_Canned]]]:
    handler = type("Handler", (_Canned,), {"paths": [], "cookies": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "payload",
    [
        {"humanId": "h", "publicToken": "p", "clientUserId": "u"},  # no accessToken
        {"accessToken": "a", "clientUserId": "u"},  # no humanId
        {"humanId": "h", "accessToken": "a"},  # no clientUserId
        {"humanId": "h", "accessToken": "", "clientUserId": "u"},
        ["not", "an", "object"],
        "not json",
    ],
)
def test_malformed_success_is_permanent(canned, payload: object) -> None:
    """A 2xx without humanId, accessToken and clientUserId is a permanent failure."""
    url, handler = canned
    handler.payload = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    with pytest.raises(PermanentUpstreamError):
        call(url)


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_a_redirect_is_never_followed(canned, code: int) -> None:
    """The tokens call carries the client secret: a redirect is refused as the status it is,
    and nothing is posted to the place it names."""
    url, handler = canned
    handler.status = code
    # The place named: this same server, under a path that answers 201 with a full body.
    handler.location = f"{url}/elsewhere"
    handler.payload = json.dumps(
        {"humanId": "h", "accessToken": "a", "clientUserId": "u", "publicToken": "p"}
    ).encode()
    with pytest.raises(PermanentUpstreamError) as info:
        call(url)
    assert info.value.status == code
    assert handler.paths == ["/v1/connect/tokens"]


def test_cookies_the_upstream_sets_are_sent_back(canned) -> None:
    """A cookie the upstream sets (a balancer's affinity, say) comes back on later calls."""
    url, handler = canned
    handler.payload = json.dumps(
        {"humanId": "h", "accessToken": "a", "clientUserId": "u", "publicToken": "p"}
    ).encode()
    handler.set_cookie = "affinity=node-7; Path=/"
    other = url + PUBLICTOKENS_PATH
    body = {"humanId": "h", "clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET}
    try:
        call(url)
        call(url)
        # A call to another endpoint, first made with the cookie in the jar ...
        post_json(other, body, connect_timeout=1, read_timeout=5)
        # ... still sends the cookie as it is now, once the upstream changed it
        handler.set_cookie = "affinity=node-9; Path=/"
        call(url)
        post_json(other, body, connect_timeout=1, read_timeout=5)
    finally:
        http_session().cookies.clear()  # this thread's session outlives the test
    assert handler.cookies == [
        "",
        "affinity=node-7",
        "affinity=node-7",
        "affinity=node-7",
        "affinity=node-9",
    ]


def test_success_without_public_token_is_kept(canned) -> None:
    """A success lacking only publicToken is stored (the repair fills it in later)."""
    url, handler = canned
    handler.payload = json.dumps(
        {"humanId": "h", "accessToken": "access-value-xyz", "clientUserId": "u"}
    ).encode()
    tokens = call(url)
    assert tokens.public_token is None and tokens.access_token == "access-value-xyz"
    # The dataclass's repr (what a stray log line would show) never carries the token.
    assert "access-value-xyz" not in repr(tokens)


def test_parse_retry_after_forms() -> None:
    """Delta-seconds and HTTP dates are understood; garbage is ignored; negatives are 0."""
    assert parse_retry_after("12") == 12
    assert parse_retry_after("-3") == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    when = format_datetime(now() + timedelta(seconds=30), usegmt=True)
    parsed = parse_retry_after(when)
    assert parsed is not None and 25 <= parsed <= 31


def test_the_environments_proxy_settings_are_honoured(canned, monkeypatch) -> None:
    """requests no longer reads the environment per call; HTTP(S)_PROXY and NO_PROXY still
    decide, read once per URL."""
    proxy, handler = canned
    handler.payload = json.dumps(
        {"humanId": "h", "accessToken": "a", "clientUserId": "u", "publicToken": "p"}
    ).encode()
    # Nothing listens on the target's port: only a proxy can answer for it.
    target = f"http://127.0.0.1:{free_port()}"
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    _proxies.cache_clear()
    try:
        # Given a proxy in the environment, the call goes through it
        assert call(target).client_user_id == "u"
        assert handler.paths == [f"{target}/v1/connect/tokens"]
        # And with the target in NO_PROXY it goes straight there (and is refused)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        _proxies.cache_clear()
        with pytest.raises(TransientUpstreamError):
            call(target)
        assert len(handler.paths) == 1
    finally:
        _proxies.cache_clear()


def test_an_empty_ca_bundle_variable_never_turns_verification_off(monkeypatch) -> None:
    """requests treats verify="" as "don't verify": an empty variable must mean the default."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.setenv("CURL_CA_BUNDLE", "")
    assert _verify() is True
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "")
    assert _verify() is True
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    assert _verify() == "/etc/ssl/certs/ca-certificates.crt"
