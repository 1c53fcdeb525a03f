"""`Prefer: wait=N` through real processes: 201 with the publicToken, 422, or 202 in time."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from humanconnect.standin import Faults, Running
from tests import factories
from tests.support.processes import Deployment


@pytest.fixture
def web(deploy: Callable[..., Deployment]) -> Deployment:
    return deploy()


def test_fast_upstream_answers_201_with_the_public_token(web, standin: Running) -> None:
    """Against a fast upstream, wait=5 gets 201 with publicToken at the top level."""
    body = factories.finish_body()
    started = time.monotonic()
    resp = httpx.post(
        web.url + "/connect/finish", json=body, headers={"Prefer": "wait=5"}, timeout=10
    )
    elapsed = time.monotonic() - started
    assert resp.status_code == 201, resp.text
    data = resp.json()
    issued = standin.state.by_human[body["humanId"]]
    assert data["status"] == "succeeded"
    assert data["publicToken"] == issued.public_token
    assert data["clientUserId"] == issued.client_user_id
    assert issued.access_token not in resp.text
    assert resp.headers["Preference-Applied"] == "wait=5"
    assert elapsed < 5


def test_slow_upstream_answers_202_after_about_n_seconds(web, standin: Running) -> None:
    """Against an upstream slower than N, the answer is 202 after about N seconds."""
    standin.state.faults = Faults(latency_ms=4000)
    started = time.monotonic()
    resp = httpx.post(
        web.url + "/connect/finish",
        json=factories.finish_body(),
        headers={"Prefer": "wait=1"},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert resp.status_code == 202
    assert resp.headers["Location"] == resp.json()["statusUrl"]
    assert 0.9 <= elapsed < 2.5


def test_permanent_failure_answers_422_with_the_status(web, standin: Running) -> None:
    """A refused session under wait mode gets 422 and the failed status body."""
    standin.state.faults = Faults(refuse_status=401)
    resp = httpx.post(
        web.url + "/connect/finish",
        json=factories.finish_body(),
        headers={"Prefer": "wait=5"},
        timeout=10,
    )
    assert resp.status_code == 422
    assert resp.json()["status"] == "failed" and "401" in resp.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "prefer", ["wait=99", "wait=abc", "wait=-1", "respond-async, wait=", "wait=nan"]
)
def test_bad_wait_values_get_the_default_not_an_error(web, prefer: str) -> None:
    """A wait above 30 or malformed is served with the default wait, never a 4xx."""
    resp = httpx.post(
        web.url + "/connect/finish",
        json=factories.finish_body(),
        headers={"Prefer": prefer},
        timeout=15,
    )
    assert resp.status_code == 201
    assert resp.headers["Preference-Applied"] == "wait=10"


def test_duplicate_with_wait_returns_the_finished_status(web, standin: Running) -> None:
    """Posting a finished session again with wait gets 201 at once, without a new exchange."""
    body = factories.finish_body()
    first = httpx.post(
        web.url + "/connect/finish", json=body, headers={"Prefer": "wait=5"}, timeout=10
    )
    again = httpx.post(
        web.url + "/connect/finish", json=body, headers={"Prefer": "wait=5"}, timeout=10
    )
    assert first.status_code == again.status_code == 201
    assert again.json()["requestId"] == first.json()["requestId"]
    assert standin.state.exchanges.total() == 1
