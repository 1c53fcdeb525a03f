"""Connect tickets: the app's server vouches for its user; the web refuses a finish without a
valid one (401, nothing queued) and hands the ticket's user on with the request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Callable

import jwt
import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import event, given, settings
from hypothesis import strategies as st

from humanconnect import redis_keys
from humanconnect.redis_keys import QUEUE
from humanconnect.tickets import TicketError, _plain_claims, mint, verify
from tests import factories
from tests.support.env import BIN, TICKET_KEY, service_env
from tests.support.scan import assert_no_secrets, task_kwargs

JSON = {"Content-Type": "application/json"}


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _signed(claims: dict[str, object], key: str = TICKET_KEY, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def _bad_tickets() -> dict[str, tuple[str, str]]:
    """name -> (ticket, the 401's error)."""
    now = int(time.time())
    return {
        "garbage": ("not-a-ticket", "ticket invalid"),
        "alg none": (
            _b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"sub": "u", "exp": now + 60}) + ".",
            "ticket invalid",
        ),
        "another key": (
            _signed({"sub": "u", "exp": now + 60}, key="another-key-0123456789abcdef0123"),
            "ticket invalid",
        ),
        "HS512": (
            _signed({"sub": "u", "exp": now + 60}, key=TICKET_KEY * 2, alg="HS512"),
            "ticket invalid",
        ),
        "expired": (_signed({"sub": "u", "exp": now - 120}), "ticket expired"),
        "exp too far ahead": (_signed({"sub": "u", "exp": now + 7200}), "ticket invalid"),
        "no sub": (_signed({"exp": now + 60}), "ticket invalid"),
        "empty sub": (_signed({"sub": "", "exp": now + 60}), "ticket invalid"),
        "no exp": (_signed({"sub": "u"}), "ticket invalid"),
    }


@pytest.mark.parametrize("name", list(_bad_tickets()))
def test_verify_refuses_every_bad_ticket(name: str) -> None:
    """Garbage, alg none, another key or algorithm, expired, too far ahead, no sub or exp."""
    ticket, reason = _bad_tickets()[name]
    with pytest.raises(TicketError) as refused:
        verify(TICKET_KEY, ticket)
    assert refused.value.reason == reason


def test_verify_takes_a_minted_ticket_and_the_leeway() -> None:
    """A minted ticket gives back its user; 20 s past exp is within the 30 s leeway."""
    assert verify(TICKET_KEY, mint(TICKET_KEY, "user-1", 60)) == "user-1"
    late = _signed({"sub": "user-2", "exp": int(time.time()) - 20})
    assert verify(TICKET_KEY, late) == "user-2"
    with pytest.raises(TicketError, match="missing"):
        verify(TICKET_KEY, None)


@pytest.fixture
def ticketed(make_client: Callable[..., TestClient]) -> TestClient:
    """The web with HUMANCONNECT_TICKET_KEY set: tickets required."""
    return make_client(HUMANCONNECT_TICKET_KEY=TICKET_KEY)


def _nothing_written(r: redis.Redis) -> bool:
    return r.llen(QUEUE) == 0 and not r.keys(redis_keys.PREFIX + "*")


@pytest.mark.parametrize("name", ["missing", *_bad_tickets()])
def test_every_bad_ticket_is_401_and_nothing_is_queued(
    ticketed: TestClient, redis_client: redis.Redis, name: str
) -> None:
    """Each refusal is a 401 naming why (missing, expired, invalid), and Redis is untouched."""
    ticket, reason = ("", "ticket missing") if name == "missing" else _bad_tickets()[name]
    headers = {**JSON, "Authorization": f"Bearer {ticket}"} if ticket else JSON
    resp = ticketed.post("/connect/finish", json=factories.finish_body(), headers=headers)
    assert resp.status_code == 401
    assert resp.json() == {"error": reason, "fields": {}}
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert _nothing_written(redis_client)


@pytest.mark.parametrize("where", ["header", "body", "query"])
def test_a_valid_ticket_is_read_from_each_place_and_travels_with_the_request(
    ticketed: TestClient, redis_client: redis.Redis, where: str
) -> None:
    """Authorization header, body field or ?ticket=: 202, and the queued request carries the
    ticket's user (in the message and in the record a re-send reads), never the ticket."""
    ticket = mint(TICKET_KEY, "alice@example.com")
    body = factories.finish_body()
    headers, url = dict(JSON), "/connect/finish"
    if where == "header":
        headers["Authorization"] = f"Bearer {ticket}"
    elif where == "body":
        body["ticket"] = ticket
    else:
        url += f"?ticket={ticket}"
    resp = ticketed.post(url, json=body, headers=headers)
    assert resp.status_code == 202, resp.text
    message = json.loads(redis_client.lrange(QUEUE, 0, -1)[0])
    kwargs = task_kwargs(message)
    assert kwargs["expected_client_user_id"] == "alice@example.com"
    record = redis_client.hgetall(redis_keys.request_status(resp.json()["requestId"]))
    assert record[b"expectedClientUserId"] == b"alice@example.com"
    status = ticketed.get(resp.headers["Location"])
    assert_no_secrets(
        [ticket], redis_client=redis_client, texts={"202": resp.text, "status": status.text}
    )


def test_refusals_keep_the_contracts_order(ticketed: TestClient, redis_client: redis.Redis) -> None:
    """413 before 401; 401 before 415 and 400; with a ticket, 415, 400 and 422 as before."""
    big = b"{" + b" " * 20_000 + b"}"
    assert ticketed.post("/connect/finish", content=big, headers=JSON).status_code == 413
    plain = {"Content-Type": "text/plain"}
    assert ticketed.post("/connect/finish", content=b"x", headers=plain).status_code == 401
    assert ticketed.post("/connect/finish", content=b"not json", headers=JSON).status_code == 401
    auth = {"Authorization": f"Bearer {mint(TICKET_KEY, 'u')}"}
    resp = ticketed.post("/connect/finish", content=b"x", headers={**plain, **auth})
    assert resp.status_code == 415
    resp = ticketed.post("/connect/finish", content=b"not json", headers={**JSON, **auth})
    assert resp.status_code == 400
    other = factories.finish_body(clientId="f" * 40)
    assert ticketed.post("/connect/finish", json=other, headers=auth).status_code == 422
    assert _nothing_written(redis_client)


def test_a_duplicate_answers_as_before_whatever_its_ticket(
    ticketed: TestClient, redis_client: redis.Redis
) -> None:
    """The same session posted again with another user's valid ticket: the same requestId,
    and the request still bound to the first ticket's user."""
    body = factories.finish_body()
    first = ticketed.post(
        "/connect/finish", json=body, headers={"Authorization": f"Bearer {mint(TICKET_KEY, 'a')}"}
    )
    again = ticketed.post(
        "/connect/finish", json=body, headers={"Authorization": f"Bearer {mint(TICKET_KEY, 'b')}"}
    )
    assert first.status_code == again.status_code == 202
    assert again.json()["requestId"] == first.json()["requestId"]
    assert redis_client.llen(QUEUE) == 1
    record = redis_client.hgetall(redis_keys.request_status(first.json()["requestId"]))
    assert record[b"expectedClientUserId"] == b"a"
    # A duplicate still needs a valid ticket of its own.
    assert ticketed.post("/connect/finish", json=body, headers=JSON).status_code == 401


def test_without_a_key_no_ticket_is_needed_and_web_warns(
    make_client: Callable[..., TestClient],
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No HUMANCONNECT_TICKET_KEY: finishes work as before, a sent ticket is ignored, and the
    web says at start that any client can finish for any user."""
    with caplog.at_level("WARNING"):
        web = make_client()
    warnings = [
        r.getMessage() for r in caplog.records if "HUMANCONNECT_TICKET_KEY" in r.getMessage()
    ]
    assert len(warnings) == 1 and "any client" in warnings[0]
    assert web.post("/connect/finish", json=factories.finish_body()).status_code == 202
    headers = {"Authorization": "Bearer not-a-ticket"}
    resp = web.post("/connect/finish", json=factories.finish_body(), headers=headers)
    assert resp.status_code == 202


def test_a_short_key_stops_the_web_naming_it() -> None:
    """A ticket key under 32 bytes is refused at start, with the variable named, not the key."""
    env = service_env(
        REDIS_URL="redis://127.0.0.1:1/0",
        HUMANAPI_CLIENT_ID="c" * 40,
        HUMANCONNECT_ENCRYPTION_KEYS="ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg=",
        HUMANCONNECT_TICKET_KEY="short-key-value",
    )
    done = subprocess.run(
        [str(BIN / "humanconnect"), "ticket", "u"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "HUMANCONNECT_TICKET_KEY" in done.stderr and "short-key-value" not in done.stderr


def test_ticket_command_prints_a_ticket_the_service_accepts() -> None:
    """`humanconnect ticket USER --ttl S` prints a ticket that verifies as USER, living S s."""
    env = service_env(HUMANCONNECT_TICKET_KEY=TICKET_KEY)
    done = subprocess.run(
        [str(BIN / "humanconnect"), "ticket", "bob@example.com", "--ttl", "120"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ticket = done.stdout.strip()
    assert verify(TICKET_KEY, ticket) == "bob@example.com"
    claims = jwt.decode(ticket, TICKET_KEY, algorithms=["HS256"])
    assert 110 <= claims["exp"] - time.time() <= 121


_OFFSETS = st.sampled_from([-200, -40, -20, 0, 60, 3500, 3700, 7200])
_ODD_VALUES = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.floats(0, 2e9))


def _segment(data: dict[str, object], separators: tuple[str, str]) -> str:
    raw = json.dumps(data, separators=separators, sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@st.composite
def _any_ticket(draw: st.DrawFn) -> str:
    """A ticket as `mint` writes it, or one that differs from it in a few ways: a claim
    missing, of another type or out of time, another claim or header, another key or
    algorithm, an odd encoding signed all the same, a flipped character."""

    def odd() -> bool:  # each way of differing, one time in ten
        return draw(st.integers(0, 9)) == 0

    now = int(time.time())
    claims: dict[str, object] = {"sub": "user-1", "exp": now + 600}
    for name in ("sub", "exp"):
        if odd():
            del claims[name]
        elif odd():
            claims[name] = draw(_ODD_VALUES)
    if odd():
        claims["exp"] = now + draw(_OFFSETS)
    if draw(st.booleans()):
        claims["iat"] = now + draw(st.sampled_from([-100, 0, 20, 40, 100]))
        if odd():
            claims["iat"] = draw(_ODD_VALUES)
    if draw(st.booleans()):
        claims["email"] = draw(st.one_of(st.just("a@example.com"), _ODD_VALUES))
    if odd():
        claims[draw(st.sampled_from(["nbf", "aud", "iss", "jti", "x"]))] = draw(
            st.one_of(_OFFSETS.map(lambda o: now + o), st.text(max_size=4))
        )
    header: dict[str, object] = {"alg": "HS256", "typ": "JWT"}
    if odd():
        header.update(draw(st.sampled_from([{"kid": "1"}, {"typ": "at+jwt"}, {"alg": "HS384"}])))
    key = "another-key-0123456789abcdef0123" if odd() else TICKET_KEY
    # Signed by hand, as any library might: PyJWT's own encode refuses some of these claims.
    separators = (", ", ": ") if odd() else (",", ":")
    payload = _segment(claims, separators)
    # An odd encoding, signed all the same by the key's holder.
    if odd():
        payload += "=" * (-len(payload) % 4 or 4)
    elif odd():
        payload = payload[:3] + "!" + payload[3:]
    signing_input = f"{_segment(header, separators)}.{payload}"
    digest = hashlib.sha384 if header["alg"] == "HS384" else hashlib.sha256
    mac = hmac.new(key.encode(), signing_input.encode(), digest).digest()
    signature = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    # Damage on the way.
    if odd():
        signature = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    elif odd():
        signing_input = ("e" if signing_input[0] != "e" else "f") + signing_input[1:]
    return f"{signing_input}.{signature}"


@given(_any_ticket())
@settings(max_examples=600, deadline=None)
def test_the_short_way_reads_only_what_pyjwt_accepts_and_as_it_does(ticket: str) -> None:
    """Whatever the ticket, the short way either leaves it to PyJWT or reads the very claims
    PyJWT reads from it: it never takes one PyJWT refuses."""
    short = _plain_claims(TICKET_KEY, ticket)
    try:
        theirs = jwt.decode(
            ticket, TICKET_KEY, algorithms=["HS256"], options={"require": ["exp", "sub"]}, leeway=30
        )
    except jwt.PyJWTError:
        theirs = None
    event("short way" if short is not None else "left to PyJWT")
    assert short is None or short == theirs


def test_a_minted_ticket_is_read_the_short_way() -> None:
    """What `mint` writes (with an email or without) never needs PyJWT to be read."""
    for email in (None, "a@example.com"):
        claims = _plain_claims(TICKET_KEY, mint(TICKET_KEY, "user-1", 600, email=email))
        assert claims is not None and claims["sub"] == "user-1"
        assert claims.get("email") == email
