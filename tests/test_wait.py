"""`Prefer: wait=N` through real processes: 201 with the publicToken, 422, or 202 in time.

One web and one worker serve the whole module (per database): starting them takes seconds.
Each test still has an upstream of its own: the deployment calls a router that hands every
humanId to the stand-in of the test that sent it first, so a test's faults and counts are its
own, whatever ran before it and whatever earlier tests' sessions are still doing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from aiohttp import web as aioweb

from humanconnect.sandbox.standin import Faults, Running, StandIn
from tests import factories
from tests.support.env import CLIENT_ID, CLIENT_SECRET, HANG_GUARD, timed
from tests.support.processes import Deployment


class Router(StandIn):
    """The module's upstream: a call goes to the stand-in owning its humanId, which is the one
    that was `current` when the humanId was first seen."""

    def __init__(self) -> None:
        super().__init__(CLIENT_ID, CLIENT_SECRET)
        self.current = factories.standin()
        self.owners: dict[str, StandIn] = {}

    async def _owner(self, request: aioweb.Request) -> StandIn:
        try:
            body = await request.json()  # aiohttp keeps the body for the stand-in to read
        except ValueError:
            body = None
        human_id = body.get("humanId") if isinstance(body, dict) else None
        if not isinstance(human_id, str):
            return self.current
        return self.owners.setdefault(human_id, self.current)

    async def tokens(self, request: aioweb.Request) -> aioweb.StreamResponse:
        return await (await self._owner(request)).tokens(request)

    async def publictokens(self, request: aioweb.Request) -> aioweb.StreamResponse:
        return await (await self._owner(request)).publictokens(request)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running]:
    """The router on a port, for the module's deployment."""
    running = Running(Router()).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def deployment(module_deploy: Callable[..., Deployment], upstream: Running) -> Deployment:
    """`web` and `worker` started once for the module, against the router."""
    return module_deploy(upstream.url)


@pytest.fixture
def standin(upstream: Running) -> StandIn:
    """This test's own stand-in (overrides conftest.py's): it answers for every humanId first
    seen during the test, with fresh counts and faults that touch no other test."""
    own = factories.standin()
    router = upstream.standin
    assert isinstance(router, Router)
    router.current = own
    return own


@pytest.fixture
def web(deployment: Deployment, standin: StandIn) -> Deployment:
    """The module's deployment, its upstream this test's stand-in."""
    assert deployment.web.alive() and deployment.worker.alive()
    return deployment


def test_fast_upstream_answers_201_with_the_public_token(web, standin: StandIn) -> None:
    """Against a fast upstream, wait=5 gets 201 with publicToken at the top level: the final
    status, not the 202 of a wait that ran out."""
    body = factories.finish_body()
    resp = httpx.post(
        web.url + "/connect/finish", json=body, headers={"Prefer": "wait=5"}, timeout=60
    )
    assert resp.status_code == 201, resp.text
    data = resp.json()
    issued = standin.state.by_human[body["humanId"]]
    assert data["status"] == "succeeded"
    assert data["publicToken"] == issued.public_token
    assert data["clientUserId"] == issued.client_user_id
    assert issued.access_token not in resp.text
    assert resp.headers["Preference-Applied"] == "wait=5"


def test_slow_upstream_answers_202_once_n_seconds_are_up(web, standin: StandIn) -> None:
    """Against an upstream slower than N, the answer is 202 with the status URL, and not
    before N seconds (a wait that ran out, not one cut short)."""
    wait_s = 1
    standin.state.faults = Faults(latency_ms=4000)
    resp, took = timed(
        lambda: httpx.post(
            web.url + "/connect/finish",
            json=factories.finish_body(),
            headers={"Prefer": f"wait={wait_s}"},
            timeout=HANG_GUARD * wait_s + 5,
        )
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] != "succeeded"
    assert resp.headers["Location"] == resp.json()["statusUrl"]
    # The server's wait lies inside the client's measure; asyncio may fire 1 ms early.
    assert took >= wait_s - 0.01, took
    assert took < HANG_GUARD * wait_s, f"hung: {took:.1f} s"


def test_permanent_failure_answers_422_with_the_status(web, standin: StandIn) -> None:
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


def test_duplicate_with_wait_returns_the_finished_status(web, standin: StandIn) -> None:
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
