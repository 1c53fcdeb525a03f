"""Connect tickets: the app's server vouches for its logged-in user.

A ticket is a JWT signed with HS256 under HUMANCONNECT_TICKET_KEY: `sub` is the app's
clientUserId, `exp` is required and at most an hour ahead. The web checks it with no Redis
round trip (a signature and two times); the `sub` then travels with the request, and the worker
refuses an upstream answer that names another clientUserId.
"""

from __future__ import annotations

from datetime import timedelta

import jwt

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


def mint(key: str, client_user_id: str, ttl_s: int = 600) -> str:
    """A ticket for `client_user_id`, valid for `ttl_s` seconds (at most an hour)."""
    if not client_user_id:
        raise ValueError("a ticket needs a clientUserId")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"a ticket lives at most {MAX_TTL_S} s")
    issued = now()
    claims = {"sub": client_user_id, "iat": issued, "exp": issued + timedelta(seconds=ttl_s)}
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(key: str, ticket: str | None) -> str:
    """The clientUserId a valid ticket vouches for; TicketError otherwise."""
    if not ticket:
        raise TicketError("ticket missing")
    try:
        claims = jwt.decode(
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
    return sub
