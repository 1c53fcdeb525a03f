"""CORS for browsers on the app's origins (Starlette's CORSMiddleware, finish routes only),
and the browser routes: /humanconnect.js always, the sandbox page and tickets only in sandbox."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests import factories

APP = "https://app.example.com"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type,authorization,prefer",
}


@pytest.fixture
def web(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(HUMANCONNECT_CORS_ORIGINS=f"{APP}, https://other.example.com")


def test_a_listed_origin_may_post_and_read_the_answers_headers(web: TestClient) -> None:
    """The preflight allows POST with Content-Type, Authorization and Prefer, no credentials;
    the POST's answer lets the page read Location, Preference-Applied and Retry-After."""
    pre = web.options("/connect/finish", headers=PREFLIGHT)
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == APP
    allowed = {h.strip().lower() for h in pre.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "authorization", "prefer"} <= allowed
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in pre.headers
    resp = web.post("/connect/finish", json=factories.finish_body(), headers={"Origin": APP})
    assert resp.status_code == 202
    assert resp.headers["access-control-allow-origin"] == APP
    exposed = {h.strip() for h in resp.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"Location", "Preference-Applied", "Retry-After"}
    status = web.get(resp.headers["Location"], headers={"Origin": APP})
    assert status.headers["access-control-allow-origin"] == APP


def test_an_unlisted_origin_gets_no_cors_header(web: TestClient) -> None:
    """Not listed (nor a near miss): no Access-Control-Allow-Origin, preflight refused."""
    for origin in ("https://evil.example.com", "https://app.example.com.evil.net", "null"):
        pre = web.options("/connect/finish", headers={**PREFLIGHT, "Origin": origin})
        assert "access-control-allow-origin" not in pre.headers
        assert pre.status_code == 400
        resp = web.post("/connect/finish", json=factories.finish_body(), headers={"Origin": origin})
        assert "access-control-allow-origin" not in resp.headers


def test_only_the_browser_routes_get_cors(web: TestClient) -> None:
    """The token read-back and the operations routes never answer a browser's origin."""
    for path in ("/users/someone", "/metrics", "/readyz"):
        resp = web.get(path, headers={"Origin": APP})
        assert "access-control-allow-origin" not in resp.headers, path
    js = web.get("/humanconnect.js", headers={"Origin": APP})
    assert js.headers["access-control-allow-origin"] == APP


def test_without_origins_there_are_no_cors_headers(client: TestClient) -> None:
    """HUMANCONNECT_CORS_ORIGINS unset: no CORS header for anyone."""
    pre = client.options("/connect/finish", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in pre.headers
    resp = client.post("/connect/finish", json=factories.finish_body(), headers={"Origin": APP})
    assert "access-control-allow-origin" not in resp.headers


def test_a_malformed_origin_is_refused_at_start(make_client: Callable[..., TestClient]) -> None:
    """An origin with a path or a trailing slash is a configuration error naming it."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="is not an origin"):
        make_client(HUMANCONNECT_CORS_ORIGINS="https://app.example.com/")


def test_the_browser_client_is_served_as_a_module(client: TestClient) -> None:
    """/humanconnect.js is JavaScript exporting finishConnect, as default and by name."""
    js = client.get("/humanconnect.js")
    assert js.status_code == 200
    assert js.headers["content-type"].startswith("text/javascript")
    assert "export async function finishConnect" in js.text
    assert "export default finishConnect" in js.text


def test_the_sandbox_page_and_tickets_exist_only_in_sandbox_mode(
    make_client: Callable[..., TestClient],
) -> None:
    """Outside sandbox mode `/` and the ticket endpoint are 404; in sandbox mode the page
    is served and tickets are minted (and checked when a finish sends one)."""
    from humanconnect.tickets import verify

    real = make_client()
    assert real.get("/").status_code == 404
    assert real.get("/sandbox/ticket?clientUserId=u").status_code == 404
    sandbox = make_client(HUMANAPI_CLIENT_SECRET="")
    page = sandbox.get("/")
    assert page.status_code == 200 and "Connect health data" in page.text
    ticket = sandbox.get("/sandbox/ticket?clientUserId=u").json()["ticket"]
    key = sandbox.app.state.parts.tickets.key  # type: ignore[attr-defined]
    assert verify(key, ticket) == "u"
    # Optional in the sandbox: none is fine, a bad one is not.
    assert sandbox.post("/connect/finish", json=factories.finish_body()).status_code == 202
    bad = {"Authorization": "Bearer nope"}
    assert (
        sandbox.post("/connect/finish", json=factories.finish_body(), headers=bad).status_code
        == 401
    )
