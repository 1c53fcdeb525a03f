"""The web's response bodies and headers, for the OpenAPI document.

The handlers build their JSONResponses themselves (so FastAPI never validates or reshapes
them); these models only describe what they send. tests/test_openapi.py and schemathesis
(tests/test_fuzz.py) hold the two together.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from humanconnect.states import RequestState


class _Body(BaseModel):
    # Documented fields only; the handlers never add others.
    model_config = ConfigDict(extra="forbid")


class Error(_Body):
    """Every refusal: what is wrong, and one message per offending field (may be empty)."""

    error: str = Field(description="What is wrong, in a sentence")
    fields: dict[str, str] = Field(
        description="One message per offending field (or `body`, `Content-Type`)"
    )


class Accepted(_Body):
    """The session is queued (or was already): its status is at `statusUrl`."""

    requestId: str = Field(description="This request's id (also in a duplicate's answer)")
    status: RequestState = Field(
        description="Where the request stands; a duplicate may already be final"
    )
    statusUrl: str = Field(description="Path of `GET /connect/finish/{requestId}`")


class FinishStatus(_Body):
    """A finish request's public status: never the accessToken."""

    requestId: str
    status: RequestState
    humanId: str | None = Field(
        description="null while an access finish (the current flow) has not fetched its token"
    )
    clientUserId: str | None = Field(None, description="Present once `succeeded`")
    publicToken: str | None = Field(None, description="Present (possibly null) once `succeeded`")
    error: str | None = Field(None, description="Present once `failed`: why")


class Succeeded(_Body):
    """The exchange succeeded within the `Prefer: wait`."""

    requestId: str
    status: Literal[RequestState.SUCCEEDED]
    humanId: str
    clientUserId: str
    publicToken: str | None


class Failed(_Body):
    """The exchange failed within the `Prefer: wait`."""

    requestId: str
    status: Literal[RequestState.FAILED]
    humanId: str | None
    error: str


class NothingConnected(_Body):
    """The current flow's Connect closed with no source connected: nothing was queued."""

    status: Literal["nothing_connected"]


class ConnectToken(_Body):
    """A token to open the provider's Connect with (`data-hapi-token`)."""

    token: str = Field(description="The session or id token")
    tokenType: Literal["session", "id"] = Field(
        description="`session` for a user not stored here yet, `id` for one who is"
    )
    expiresIn: int = Field(description="Seconds the token has left")
    humanId: str | None = Field(description="The provider's id of the user, where it named one")


class AccessToken(_Body):
    """A user's valid access token (the current flow's, or the original flow's)."""

    accessToken: str
    expiresAt: str | None = Field(
        description="ISO 8601, UTC; null for an original-flow token, which states no expiry"
    )
    humanId: str


class UserTokens(_Body):
    """A user's tokens in clear."""

    clientUserId: str
    humanId: str
    accessToken: str
    publicToken: str | None
    # Not `format: date-time`: a SQLite-backed deployment gives it without a UTC offset.
    updatedAt: str = Field(description="ISO 8601, UTC, when the tokens were last stored")
    accessTokenExpiresAt: str | None = Field(
        None, description="ISO 8601, UTC: present where the access token's expiry is known"
    )


class Health(_Body):
    status: Literal["ok"]


class Readiness(_Body):
    """`ok` when every check is; each check is `ok` or the name of the error it met."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description="`redis` and `database`: `ok` or an error name")


def header(description: str, schema: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """An OpenAPI header object."""
    return {"description": description, "schema": schema or {"type": "string"}, **extra}


RETRY_AFTER = {
    "Retry-After": header("Seconds to wait before trying again", {"type": "integer"}, required=True)
}
NO_STORE = {"Cache-Control": header("`no-store`: tokens are never cached", required=True)}


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `responses=` entry for an Error body."""
    answer: dict[str, Any] = {"model": Error, "description": description}
    if headers:
        answer["headers"] = headers
    return answer


def unavailable(description: str) -> dict[str, Any]:
    """A `responses=` entry for producer.errors.unavailable()'s 503."""
    return error(f"{description}: try again after `Retry-After` seconds", RETRY_AFTER)
