"""Connect tickets: the app's server vouches for its logged-in user.

A ticket is a JWT signed with HS256 under HUMANCONNECT_TICKET_KEY: `sub` is the app's
clientUserId, `exp` is required and at most an hour ahead. The web checks it with no Redis
round trip (a signature and two times); the `sub` then travels with the request, and the worker
refuses an upstream answer that names another clientUserId.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

from humanconnect.clock import now
from humanconnect.errors import HumanConnectError

ALGORITHM = "HS256"
#: The longest a ticket may live: past this `exp` is refused as too far ahead.
MAX_TTL_S = 3600
#: Clock skew allowed between the app's server and this service.
LEEWAY_S = 30


class TicketError(HumanConnectError):
    """Raised when a finish's ticket is missing, malformed, badly signed or expired."""

    def __init__(self, reason: str):
        super().__init__(reason)
        #: "ticket missing", "ticket expired" or "ticket invalid": the 401's error.
        self.reason = reason


@dataclass(frozen=True)
class Ticket:
    """What a valid ticket vouches for."""

    #: The app's clientUserId (`sub`).
    user: str
    #: The user's email address (an optional `email` claim): the provider's current flow
    #: takes it when it mints a `session` token.
    email: str | None = None


def mint(key: str, client_user_id: str, ttl_s: int = 600, email: str | None = None) -> str:
    """A ticket for `client_user_id`, valid for `ttl_s` seconds (at most an hour)."""
    if not client_user_id:
        raise ValueError("a ticket needs a clientUserId")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"a ticket lives at most {MAX_TTL_S} s")
    issued = now()
    claims: dict[str, object] = {
        "sub": client_user_id,
        "iat": issued,
        "exp": issued + timedelta(seconds=ttl_s),
    }
    if email:
        claims["email"] = email
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(key: str, ticket: str | None) -> str:
    """The clientUserId a valid ticket vouches for; TicketError otherwise."""
    return read(key, ticket).user


def read(key: str, ticket: str | None) -> Ticket:
    """What a valid ticket vouches for; TicketError otherwise."""
    if not ticket:
        raise TicketError("ticket missing")
    try:
        claims = _plain_claims(key, ticket) or jwt.decode(
            ticket,
            key,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"]},
            leeway=LEEWAY_S,
        )
    except jwt.ExpiredSignatureError:
        raise TicketError("ticket expired") from None
    except jwt.PyJWTError:
        raise TicketError("ticket invalid") from None
    sub, exp = claims.get("sub"), claims.get("exp")
    if not isinstance(sub, str) or not sub or not isinstance(exp, int | float):
        raise TicketError("ticket invalid")
    if exp > now().timestamp() + MAX_TTL_S + LEEWAY_S:
        raise TicketError("ticket invalid")
    email = claims.get("email")
    # Bounded like the provider's field; anything else is no email rather than a refusal.
    usable = (
        isinstance(email, str)
        and 3 <= len(email) <= 254
        and "@" in email
        and not any(c.isspace() for c in email)
        and email.isprintable()
    )
    return Ticket(sub, email if usable else None)


#: The JOSE header PyJWT writes for HS256 (`mint`'s, and most libraries'), base64url-encoded.
_PLAIN_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
#: The claims `mint` writes.
_PLAIN_CLAIMS = frozenset({"sub", "exp", "iat", "email"})


def _plain_claims(key: str, ticket: str) -> dict[str, Any] | None:
    """The claims of a valid ticket in the plain form `mint` writes, read the short way; None
    for any other ticket, which PyJWT then reads (every refusal is PyJWT's).

    PyJWT spends on each ticket several times what its HMAC costs, and the web checks one per
    finish. So a ticket whose header is exactly the one above, whose signature is the
    key's HMAC-SHA256 of its first two parts in canonical base64url, whose payload is
    canonical base64url of a JSON object holding only `mint`'s claims, with a string `sub`,
    integer `exp` and `iat`, and times PyJWT would take, is one PyJWT would accept with the
    same claims; tests/test_tickets.py holds the two to the same verdicts."""
    secret = _hmac_key(key)
    if secret is None:
        return None
    try:
        signing_input, signature = ticket.encode("ascii").rsplit(b".", 1)
        header, payload = signing_input.split(b".", 1)
    except (UnicodeEncodeError, ValueError):
        return None
    if header != _PLAIN_HEADER.encode():
        return None
    mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(_b64(mac), signature):
        return None
    try:
        raw = base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if _b64(raw) != payload or not isinstance(claims, dict) or not claims.keys() <= _PLAIN_CLAIMS:
        return None
    sub, exp, iat = claims.get("sub"), claims.get("exp"), claims.get("iat", 0)
    if not isinstance(sub, str) or type(exp) is not int or type(iat) is not int:
        return None
    # PyJWT's clock and its two time checks, with the same leeway.
    now = time.time()
    if exp <= now - LEEWAY_S or iat > now + LEEWAY_S:
        return None
    return claims


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@cache
def _hmac_key(key: str) -> bytes | None:
    """The key as HS256 signs with it, if PyJWT takes it without a word: not an asymmetric
    key or a JWK (it refuses those), and long enough (it warns below 32 bytes)."""
    try:
        secret: bytes = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
    except jwt.InvalidKeyError:
        return None
    return secret if len(secret) >= hashlib.sha256().digest_size else None
