"""The provider's mobile SDKs as they ship: they post the sessionTokenObject to a fixed authURL
with no header of the app's, and count only 200/201 with a publicToken as success. `?wait=N`
on that URL gives them the answer, against a real `web` and `worker`."""

from __future__ import annotations

from collections.abc import Callable

from humanconnect.sandbox.standin import Faults, Running
from humanconnect.tickets import mint
from tests import factories
from tests.support.env import TICKET_KEY
from tests.support.processes import Deployment
from tests.support.traffic import sdk_post


def test_ios_shape_gets_201_with_the_public_token(
    deploy: Callable[..., Deployment], standin: Running
) -> None:
    """iOS (HumanConnectViewController.m): only `Content-Type: application/json`, camelCase
    body, authURL with ?wait=25: 201 with the publicToken the upstream issued."""
    d = deploy()
    body = factories.finish_body()
    status, headers, answer = sdk_post(d.url, "/connect/finish?wait=25", body, "application/json")
    assert status == 201, answer
    assert headers["preference-applied"] == "wait=25"
    assert answer["publicToken"] == standin.state.by_human[body["humanId"]].public_token


def test_android_shape_with_a_ticket_gets_201(
    deploy: Callable[..., Deployment], standin: Running
) -> None:
    """Android (ConnectActivity.java): `application/json; charset=UTF-8`; with tickets on,
    the authURL carries `&ticket=` beside `?wait=`: 201 with the publicToken."""
    d = deploy(HUMANCONNECT_TICKET_KEY=TICKET_KEY)
    body = factories.finish_body()
    user = f"{body['humanId']}@sandbox.example"  # the stand-in names this user
    path = f"/connect/finish?wait=25&ticket={mint(TICKET_KEY, user)}"
    status, _, answer = sdk_post(d.url, path, body, "application/json; charset=UTF-8")
    assert status == 201, answer
    assert answer["clientUserId"] == user
    assert answer["publicToken"] == standin.state.by_human[body["humanId"]].public_token
    # Without the ticket that same authURL is refused before anything is queued.
    status, _, answer = sdk_post(
        d.url, "/connect/finish?wait=25", factories.finish_body(), "application/json"
    )
    assert (status, answer["error"]) == (401, "ticket missing")


def test_the_header_wins_and_a_wait_that_runs_out_answers_202(
    deploy: Callable[..., Deployment], standin: Running
) -> None:
    """`Prefer: wait` beats `?wait=`; a wait that runs out answers 202 (what the SDKs report
    as a failure while the session goes on in the background)."""
    import httpx

    standin.state.faults = Faults(latency_ms=2500)
    d = deploy()
    resp = httpx.post(
        d.url + "/connect/finish?wait=25",
        json=factories.finish_body(),
        headers={"Prefer": "wait=1"},
        timeout=30,
    )
    assert resp.status_code == 202
    assert resp.headers["Preference-Applied"] == "wait=1"
    status, headers, answer = sdk_post(
        d.url, "/connect/finish?wait=1", factories.finish_body(), "application/json"
    )
    assert (status, headers["preference-applied"]) == (202, "wait=1")
    assert answer["status"] in ("queued", "running", "retrying")
