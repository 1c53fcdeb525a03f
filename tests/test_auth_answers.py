"""Reading the current flow's mint answers (humanconnect/upstream/auth.py): the documented
shapes, and the undocumented ones read tolerantly, over a real HTTP stand-in."""

from __future__ import annotations

import pytest

from humanconnect.errors import PermanentUpstreamError, TransientUpstreamError
from humanconnect.sandbox.auth import Lifetimes
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.tickets import mint as mint_ticket
from humanconnect.tickets import read
from humanconnect.upstream.auth import ASSUMED_LIFETIME_S, Minted, TokenType, mint, read_answer
from tests.support.env import CLIENT_ID, CLIENT_SECRET, TICKET_KEY


@pytest.mark.parametrize(
    "token_type, answer, lifetime",
    [
        (TokenType.SESSION, {"session_token": "s1", "expires_in": 3600}, 3600),
        (TokenType.ID, {"id_token": "i1", "id_token_expires_in": 1800}, 1800),
        (TokenType.ID, {"id_token": "i1", "expires_in": 900}, 900),  # the other name
        (TokenType.ACCESS, {"access_token": "a1", "expires_in": 86400}, 86400),
        (TokenType.ACCESS, {"access_token": "a1"}, ASSUMED_LIFETIME_S),  # none: short
        (TokenType.ACCESS, {"access_token": "a1", "expires_in": True}, ASSUMED_LIFETIME_S),
        (TokenType.ACCESS, {"access_token": "a1", "expires_in": -5}, ASSUMED_LIFETIME_S),
        (TokenType.ACCESS, {"access_token": "a1", "expires_in": "86400"}, ASSUMED_LIFETIME_S),
    ],
)
def test_lifetimes_are_read_where_the_provider_puts_them(
    token_type: TokenType, answer: dict[str, object], lifetime: int
) -> None:
    assert read_answer(token_type, answer).expires_in == lifetime


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"access_token": ""},
        {"access_token": 5},
        {"access_token": "x" * 5000},
        {"access_token": "a\nb"},
        {"access_token": " padded"},
        {"session_token": "s1"},  # the wrong kind's field
    ],
)
def test_an_answer_without_a_usable_token_is_permanent(answer: dict[str, object]) -> None:
    with pytest.raises(PermanentUpstreamError):
        read_answer(TokenType.ACCESS, answer)


def _mint(standin: Running, token_type: TokenType, user: str = "u@example.com") -> Minted:
    return mint(
        standin.url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        client_user_id=user,
        token_type=token_type,
        email="u@example.com",
        connect_timeout=2,
        read_timeout=5,
    )


def test_the_stand_in_speaks_the_documented_flow(standin: Running) -> None:
    standin.state.auth.lifetimes = Lifetimes(session=120, id=60, access=600)
    session = _mint(standin, TokenType.SESSION)
    assert (session.type, session.expires_in) == (TokenType.SESSION, 120)
    # Refused before the user connected: id and access
    for refused in (TokenType.ID, TokenType.ACCESS):
        with pytest.raises(PermanentUpstreamError) as caught:
            _mint(standin, refused)
        assert caught.value.status in (400, 404)
    standin.state.auth.connect("u@example.com", ["Tracker"])
    # Connected: a session is refused as existing (400); id and access minted
    with pytest.raises(PermanentUpstreamError) as exists:
        _mint(standin, TokenType.SESSION)
    assert exists.value.status == 400
    identified = _mint(standin, TokenType.ID)
    access = _mint(standin, TokenType.ACCESS)
    assert identified.human_id == session.human_id
    assert access.expires_in == 600
    assert standin.state.auth.newest_access["u@example.com"] == access.token
    assert "token=" not in repr(access) and access.token not in repr(access)


def test_a_provider_outage_is_transient(standin: Running) -> None:
    standin.state.faults = Faults(down=True)
    with pytest.raises(TransientUpstreamError):
        _mint(standin, TokenType.SESSION)


def test_a_ticket_carries_an_optional_email() -> None:
    with_email = read(TICKET_KEY, mint_ticket(TICKET_KEY, "u1", email="u1@example.com"))
    assert (with_email.user, with_email.email) == ("u1", "u1@example.com")
    assert read(TICKET_KEY, mint_ticket(TICKET_KEY, "u2")).email is None
