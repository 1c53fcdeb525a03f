"""The provider's current Connect flow through real `web` and `worker` processes against the
stand-in's auth host: minting Connect tokens, finishing with the close payload, reading
access tokens that expire. The contract's section "The provider's current Connect flow"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
import redis
from sqlalchemy import text

from humanconnect.clock import now_us, to_us
from humanconnect.redis_keys import QUEUES, connect_token
from humanconnect.sandbox.auth import Lifetimes
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.storage.db import session_factory
from humanconnect.tickets import mint
from tests.factories import ticket
from tests.support.env import CLIENT_SECRET, TICKET_KEY, wait_for
from tests.support.processes import Deployment
from tests.support.scan import assert_no_secrets, stored_users, stream_entries

API_TOKEN = "current-flow-read-back-token-0123"
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
SOURCE = {"name": "Starfleet Pharmacy", "id": "5b1daf3f079c652eaf41fd23"}


def closed(*connected: dict[str, str], current: list[dict[str, str]] | None = None) -> dict:
    """The Connect client's close payload."""
    return {
        "sessionResults": {
            "connectedSources": list(connected),
            "disconnectedSources": [],
            "errors": [],
        },
        "currentConnections": current if current is not None else list(connected),
    }


@pytest.fixture
def d(deploy: Callable[..., Deployment]) -> Deployment:
    return deploy(HUMANCONNECT_TICKET_KEY=TICKET_KEY, HUMANCONNECT_API_TOKEN=API_TOKEN)


def token(d: Deployment, user: str, email: str | None = None) -> httpx.Response:
    return httpx.post(d.url + "/connect/token", headers=ticket(user, email=email), timeout=30)


def finish_current(d: Deployment, user: str, payload: dict, wait: int = 10) -> httpx.Response:
    headers = {**ticket(user), "Prefer": f"wait={wait}"}
    return httpx.post(d.url + "/connect/finish", json=payload, headers=headers, timeout=30)


def connected_user(d: Deployment, standin: Running, user: str) -> dict:
    """A user who opened Connect, connected a source, and whose finish succeeded."""
    opened = token(d, user)
    assert opened.status_code == 200, opened.text
    standin.state.auth.connect(user, [SOURCE["name"]])
    done = finish_current(d, user, closed(SOURCE))
    assert done.status_code == 201, done.text
    return done.json()


def test_a_session_token_is_minted_once_then_handed_out_again(
    d: Deployment, standin: Running, redis_client: redis.Redis
) -> None:
    first = token(d, "ada@example.com", email="ada@example.com")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["tokenType"] == "session"
    assert 3500 < body["expiresIn"] <= 3600
    assert body["humanId"]
    assert first.headers["Cache-Control"] == "no-store"
    again = token(d, "ada@example.com")
    assert again.json()["token"] == body["token"]
    assert standin.state.auth.mints == {"session:ada@example.com": 1}
    # The kept token is sealed in Redis, never in clear
    assert redis_client.exists(connect_token("ada@example.com"))
    assert_no_secrets([body["token"], CLIENT_SECRET], redis_client=redis_client, files=d.logs)


def test_a_token_with_a_minute_left_is_minted_again(d: Deployment, standin: Running) -> None:
    standin.state.auth.lifetimes = Lifetimes(session=62)
    first = token(d, "bo@example.com").json()
    time.sleep(2.5)  # past "more than 60 s left"
    second = token(d, "bo@example.com").json()
    assert first["token"] != second["token"]
    assert standin.state.auth.mints["session:bo@example.com"] == 2


def test_tickets_are_required(d: Deployment, standin: Running) -> None:
    missing = httpx.post(d.url + "/connect/token", timeout=10)
    assert (missing.status_code, missing.json()["error"]) == (401, "ticket missing")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    forged = mint("another-key-of-at-least-32-bytes-000000", "ada@example.com")
    bad = httpx.post(
        d.url + "/connect/token", headers={"Authorization": f"Bearer {forged}"}, timeout=10
    )
    assert (bad.status_code, bad.json()["error"]) == (401, "ticket invalid")
    no_ticket_finish = httpx.post(d.url + "/connect/finish", json=closed(SOURCE), timeout=10)
    assert no_ticket_finish.status_code == 401
    assert standin.state.auth.mints == {}


def test_a_finish_stores_the_access_token_and_announces_the_sources(
    d: Deployment, standin: Running, redis_client: redis.Redis
) -> None:
    status = connected_user(d, standin, "cy@example.com")
    assert status["status"] == "succeeded"
    assert status["clientUserId"] == "cy@example.com"
    assert status["humanId"] and status["publicToken"] is None
    auth = standin.state.auth
    issued = auth.newest_access["cy@example.com"]
    user = stored_users(d.db_url)[status["humanId"]]
    assert user.access_token == issued
    assert user.access_expires_us is not None
    left_s = (user.access_expires_us - now_us()) / 1e6
    assert 86000 < left_s <= 86400
    events = wait_for(lambda: stream_entries(redis_client), 10, what="the event")
    assert [(e["type"], e["clientUserId"], e["connectedSources"]) for e in events] == [
        ("connect.completed", "cy@example.com", "Starfleet Pharmacy")
    ]
    # The read-back shows the expiry; the access-token read hands out the stored token
    read = httpx.get(d.url + "/users/cy@example.com", headers=BEARER, timeout=10).json()
    assert read["accessToken"] == issued and read["accessTokenExpiresAt"]
    got = httpx.get(d.url + "/users/cy@example.com/access-token", headers=BEARER, timeout=10)
    assert got.status_code == 200, got.text
    assert got.json()["accessToken"] == issued and got.json()["humanId"] == status["humanId"]
    assert auth.mints["access:cy@example.com"] == 1
    # And a stored user opens Connect with an id token
    redis_client.delete(connect_token("cy@example.com"))
    again = token(d, "cy@example.com").json()
    assert again["tokenType"] == "id" and again["humanId"] == status["humanId"]
    minted = [*auth.tokens, issued]
    assert_no_secrets(
        [*minted, CLIENT_SECRET], redis_client=redis_client, db_url=d.db_url, files=d.logs
    )


def test_a_user_the_provider_knows_gets_an_id_token_after_the_session_is_refused(
    d: Deployment, standin: Running
) -> None:
    standin.state.auth.connect("dee@example.com", ["Elsewhere"])  # connected, not stored here
    answer = token(d, "dee@example.com")
    assert answer.status_code == 200, answer.text
    assert answer.json()["tokenType"] == "id"
    assert standin.state.auth.refusals["session:exists"] == 1
    assert standin.state.auth.mints == {"id:dee@example.com": 1}


def test_nothing_connected_queues_nothing(d: Deployment, redis_client: redis.Redis) -> None:
    answer = finish_current(d, "eve@example.com", closed(current=[]))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "nothing_connected"}
    assert sum(redis_client.llen(q) for q in QUEUES) == 0
    with session_factory(d.db_url)() as db:
        assert db.execute(text("SELECT count(*) FROM sessions")).scalar_one() == 0


def test_the_provider_down_is_a_503_and_nothing_kept(
    d: Deployment, standin: Running, redis_client: redis.Redis
) -> None:
    standin.state.faults = Faults(down=True)
    started = time.monotonic()
    answer = token(d, "fay@example.com")
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"]
    assert time.monotonic() - started < 15
    assert not redis_client.exists(connect_token("fay@example.com"))
    # Back up: asked again, a token
    standin.state.faults = Faults()
    assert wait_for(lambda: token(d, "fay@example.com").status_code == 200, 30)


def test_access_refused_for_a_user_with_no_source_left(d: Deployment, standin: Running) -> None:
    status = connected_user(d, standin, "gil@example.com")
    _expire(d.db_url, status["humanId"])
    standin.state.auth.sources["gil@example.com"] = []  # disconnected everything
    answer = httpx.get(d.url + "/users/gil@example.com/access-token", headers=BEARER, timeout=30)
    assert answer.status_code == 409, answer.text
    assert "refused" in answer.json()["error"]


def test_a_finish_for_a_user_who_connected_nothing_fails_and_stores_nothing(
    d: Deployment, standin: Running, redis_client: redis.Redis
) -> None:
    """The page claims a source, the provider knows none: it refuses the access token."""
    opened = token(d, "ike@example.com")
    assert opened.status_code == 200, opened.text
    answer = finish_current(d, "ike@example.com", closed(SOURCE))
    assert answer.status_code == 422, answer.text
    assert answer.json()["status"] == "failed"
    assert standin.state.auth.refusals["access:not_connected"] == 1
    assert stored_users(d.db_url) == {}
    events = wait_for(lambda: stream_entries(redis_client), 10, what="the event")
    assert [(e["type"], e["clientUserId"]) for e in events] == [
        ("connect.failed", "ike@example.com")
    ]


def test_a_short_lived_access_token_is_handed_out_as_minted(
    d: Deployment, standin: Running
) -> None:
    """A provider that gives access tokens less than the 5 minutes the read wants left: the
    token just minted for this read is handed out all the same, not a 503."""
    standin.state.auth.lifetimes = Lifetimes(access=200)
    connected_user(d, standin, "jan@example.com")
    got = httpx.get(d.url + "/users/jan@example.com/access-token", headers=BEARER, timeout=30)
    assert got.status_code == 200, got.text
    assert got.json()["accessToken"] == standin.state.auth.newest_access["jan@example.com"]
    assert standin.state.auth.mints["access:jan@example.com"] == 2  # the finish's, the read's


def test_a_finish_after_the_last_one_ended_is_new_unless_it_is_a_resend(
    d: Deployment, standin: Running
) -> None:
    first = connected_user(d, standin, "kit@example.com")
    resent = finish_current(d, "kit@example.com", closed(SOURCE))
    assert resent.json()["requestId"] == first["requestId"]  # the same payload: a resend
    standin.state.auth.connect("kit@example.com", ["Second Source"])
    second_source = {"name": "Second Source", "id": "s2"}
    added = finish_current(
        d, "kit@example.com", closed(second_source, current=[SOURCE, second_source])
    )
    assert added.status_code == 201, added.text
    assert added.json()["requestId"] != first["requestId"]
    assert standin.state.auth.mints["access:kit@example.com"] == 2


def test_erasing_a_user_who_only_opened_connect_drops_the_kept_token(
    d: Deployment, redis_client: redis.Redis
) -> None:
    assert token(d, "lou@example.com").status_code == 200
    assert redis_client.exists(connect_token("lou@example.com"))
    erased = httpx.delete(d.url + "/users/lou@example.com", headers=BEARER, timeout=10)
    assert erased.status_code == 404  # nothing stored of them
    assert not redis_client.exists(connect_token("lou@example.com"))


def test_concurrent_reads_of_an_expired_token_make_one_upstream_call(
    d: Deployment, standin: Running
) -> None:
    status = connected_user(d, standin, "hal@example.com")
    old = standin.state.auth.newest_access["hal@example.com"]
    _expire(d.db_url, status["humanId"])

    async def read_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
            return await asyncio.gather(
                *(c.get("/users/hal@example.com/access-token", headers=BEARER) for _ in range(50))
            )

    answers = asyncio.run(read_all())
    assert [a.status_code for a in answers] == [200] * 50
    tokens = {a.json()["accessToken"] for a in answers}
    new = standin.state.auth.newest_access["hal@example.com"]
    assert tokens == {new} and new != old
    assert standin.state.auth.mints["access:hal@example.com"] == 2  # the finish's, then one
    assert stored_users(d.db_url)[status["humanId"]].access_token == new


def test_a_page_looping_on_a_refused_mint_is_held_to_the_per_user_limit(
    deploy: Callable[..., Deployment], standin: Running
) -> None:
    """Every mint refused (the provider rejects this deployment's credentials): each ask that
    starts one counts against its ticket user's HUMANCONNECT_FINISH_LIMIT_PER_USER, and past
    it the ask is refused `429` without a mint. Another user has a budget of their own."""
    d = deploy(
        HUMANCONNECT_TICKET_KEY=TICKET_KEY,
        HUMANCONNECT_FINISH_LIMIT_PER_USER="2/minute",
        HUMANAPI_CLIENT_SECRET="not-this-apps-secret-0123456789",
    )
    answers = [token(d, "kim@example.com") for _ in range(4)]
    assert [a.status_code for a in answers] == [502, 502, 429, 429], answers[-1].text
    assert answers[0].json()["error"].endswith("upstream refused with 401")
    assert answers[2].json()["error"] == "too many tokens for this user, try again later"
    assert 1 <= int(answers[2].headers["Retry-After"]) <= 30
    assert standin.state.auth.refusals["any:credentials"] == 2
    assert token(d, "lea@example.com").status_code == 502
    assert standin.state.auth.refusals["any:credentials"] == 3


def test_asks_that_join_a_mint_under_way_or_get_a_kept_token_are_never_limited(
    deploy: Callable[..., Deployment], standin: Running
) -> None:
    """At one mint a minute, eight tabs opening Connect at once while the provider takes
    1.5 s: one mint, all eight served; then asked again, the kept token, not a 429."""
    d = deploy(HUMANCONNECT_TICKET_KEY=TICKET_KEY, HUMANCONNECT_FINISH_LIMIT_PER_USER="1/minute")
    standin.state.faults = Faults(latency_ms=1500)

    async def open_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
            return await asyncio.gather(
                *(c.post("/connect/token", headers=ticket("max@example.com")) for _ in range(8))
            )

    answers = asyncio.run(open_all())
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert len({a.json()["token"] for a in answers}) == 1
    again = token(d, "max@example.com")
    assert again.status_code == 200 and again.json()["token"] == answers[0].json()["token"]
    assert standin.state.auth.mints == {"session:max@example.com": 1}


def test_finishes_of_one_user_coalesce_while_one_is_queued(
    make_client: Callable[..., object], redis_client: redis.Redis
) -> None:
    """No worker runs here: the first finish stays queued."""
    c = make_client(HUMANCONNECT_TICKET_KEY=TICKET_KEY)
    first = c.post("/connect/finish", json=closed(SOURCE), headers=ticket("ivy@example.com"))  # type: ignore[attr-defined]
    second = c.post("/connect/finish", json=closed(SOURCE), headers=ticket("ivy@example.com"))  # type: ignore[attr-defined]
    other = c.post("/connect/finish", json=closed(SOURCE), headers=ticket("jo@example.com"))  # type: ignore[attr-defined]
    assert [r.status_code for r in (first, second, other)] == [202, 202, 202]
    assert first.json()["requestId"] == second.json()["requestId"]
    assert other.json()["requestId"] != first.json()["requestId"]
    assert sum(redis_client.llen(q) for q in QUEUES) == 2
    status = c.get(first.headers["Location"]).json()  # type: ignore[attr-defined]
    assert status == {"requestId": first.json()["requestId"], "status": "queued", "humanId": None}


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"sessionResults": "nope"}, "sessionResults"),
        ({"sessionResults": {"connectedSources": "x"}}, "sessionResults.connectedSources"),
        (
            {"sessionResults": {"connectedSources": [{"id": "1"}]}},
            "sessionResults.connectedSources.0.name",
        ),
        (
            {"sessionResults": {"connectedSources": [{"name": "x" * 129}]}},
            "sessionResults.connectedSources.0.name",
        ),
        (
            {"sessionResults": {"connectedSources": [{"name": "a\nb"}]}},
            "sessionResults.connectedSources.0.name",
        ),
        (
            {"sessionResults": {"connectedSources": [{"name": "a"}] * 101}},
            "sessionResults.connectedSources",
        ),
        ({"sessionResults": {}, "currentConnections": [1]}, "currentConnections.0"),
    ],
)
def test_bad_close_payloads_are_refused_and_nothing_queued(
    make_client: Callable[..., object], redis_client: redis.Redis, payload: dict, field: str
) -> None:
    c = make_client(HUMANCONNECT_TICKET_KEY=TICKET_KEY)
    answer = c.post("/connect/finish", json=payload, headers=ticket("kim@example.com"))  # type: ignore[attr-defined]
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid close payload"
    assert field in answer.json()["fields"]
    assert sum(redis_client.llen(q) for q in QUEUES) == 0


def test_the_token_route_is_off_without_a_ticket_key(make_client: Callable[..., object]) -> None:
    c = make_client()
    answer = c.post("/connect/token", headers=ticket("lee@example.com"))  # type: ignore[attr-defined]
    assert answer.status_code == 404


def _expire(db_url: str, human_id: str, left_s: float = 60) -> None:
    """The stored access token has `left_s` to live: less than the 5 minutes handed out."""
    with session_factory(db_url)() as db:
        db.execute(
            text("UPDATE users SET access_expires_us = :t WHERE human_id = :h"),
            {"t": now_us() + to_us(left_s), "h": human_id},
        )
        db.commit()
