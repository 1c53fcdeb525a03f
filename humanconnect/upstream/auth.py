"""The provider's current Connect flow: `POST {HUMANAPI_AUTH_URL}/v1/connect/token`.

One endpoint mints three kinds of token (the contract's "The provider's current Connect
flow"): `session` for a user who has not connected yet, `id` for one who has, `access` for
reading a connected user's data. The same classification as the tokens endpoint
(humanconnect/upstream/client.py). What the provider does not document is read tolerantly:
the `id` token's lifetime under either name, a missing lifetime as a short one, an
`access` answer that names the humanId.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from humanconnect.errors import PermanentUpstreamError
from humanconnect.upstream.client import post_json

TOKEN_PATH = "/v1/connect/token"
#: A minted token's lifetime when the answer gives none: short, so a cached one is soon
#: minted again rather than handed out past an expiry nobody told us.
ASSUMED_LIFETIME_S = 300
#: Longer than any token seen (an access token is a few hundred characters).
MAX_TOKEN_CHARS = 4096


class TokenType(StrEnum):
    SESSION = "session"
    ID = "id"
    ACCESS = "access"


#: The answer's token field, and its lifetime fields in the order they are looked for.
_FIELDS: dict[TokenType, tuple[str, tuple[str, ...]]] = {
    TokenType.SESSION: ("session_token", ("expires_in",)),
    TokenType.ID: ("id_token", ("id_token_expires_in", "expires_in")),
    TokenType.ACCESS: ("access_token", ("expires_in",)),
}


@dataclass(frozen=True)
class Minted:
    """A token the provider minted. Never logged: see __repr__."""

    type: TokenType
    token: str
    expires_in: int
    human_id: str | None

    def __repr__(self) -> str:
        return f"Minted(type={self.type!s}, human_id={self.human_id!r})"


def mint(
    auth_url: str,
    *,
    client_id: str,
    client_secret: str,
    client_user_id: str,
    token_type: TokenType,
    email: str | None = None,
    connect_timeout: float,
    read_timeout: float,
) -> Minted:
    """Ask the provider for one token of `token_type` for `client_user_id`."""
    body = {
        "client_id": client_id,
        "client_secret": client_secret,
        "client_user_id": client_user_id,
        "type": str(token_type),
    }
    if email and token_type is TokenType.SESSION:
        body["client_user_email"] = email
    data = post_json(
        auth_url + TOKEN_PATH, body, connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    return read_answer(token_type, data)


def read_answer(token_type: TokenType, data: dict[str, Any]) -> Minted:
    """The token in a success body; PermanentUpstreamError when it has none."""
    field, lifetimes = _FIELDS[token_type]
    token = data.get(field)
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise PermanentUpstreamError(f"upstream {token_type} answer lacks {field}")
    if not token.isprintable() or token != token.strip():
        raise PermanentUpstreamError(f"upstream {token_type} answer's {field} is malformed")
    human_id = data.get("human_id")
    return Minted(
        type=token_type,
        token=token,
        expires_in=_lifetime(data, lifetimes),
        human_id=human_id if isinstance(human_id, str) and human_id else None,
    )


def _lifetime(data: dict[str, Any], names: tuple[str, ...]) -> int:
    for name in names:
        value = data.get(name)
        # bool is an int: `true` is not a lifetime.
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return int(value)
    return ASSUMED_LIFETIME_S
