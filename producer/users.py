"""`GET /users/{clientUserId}`, token read-back, and `DELETE /users/{clientUserId}`, erasure:
both behind a bearer token."""

from __future__ import annotations

import hmac
from typing import Any

import redis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from humanconnect.clock import iso_from_us
from humanconnect.erasure import erase
from humanconnect.minting import MintKind, fresh
from humanconnect.storage.tokens import StoredUser
from humanconnect.users import read_user, valid_client_user_id
from producer import schemas
from producer.bearer import bearer_token
from producer.errors import error, unavailable
from producer.mints import MintRefused, MintUnavailable
from producer.state import Parts

NO_STORE = {"Cache-Control": "no-store"}


def authorized(request: Request, expected: str) -> bool:
    """Only the Authorization header counts (a token in the URL is never accepted), compared
    in constant time."""
    token = bearer_token(request)
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


SECURITY_SCHEME = "bearerToken"
#: Merged into the document's components by producer/app.py.
SECURITY_SCHEMES = {
    SECURITY_SCHEME: {
        "type": "http",
        "scheme": "bearer",
        "description": "HUMANCONNECT_API_TOKEN, in the Authorization header only",
    }
}
USER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": schemas.UserTokens,
        "description": "The user's tokens",
        "headers": schemas.NO_STORE,
    },
    401: schemas.error(
        "Missing or wrong bearer token",
        {"WWW-Authenticate": schemas.header("`Bearer`", required=True)},
    ),
    404: schemas.error(
        "No such user; or the read-back is off (no HUMANCONNECT_API_TOKEN), whatever the token",
        {"Cache-Control": schemas.header("`no-store`, for an unknown user")},
    ),
    503: schemas.unavailable("The database is unavailable"),
}


ACCESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": schemas.AccessToken,
        "description": "A valid access token: the stored one while it has 5 minutes or more "
        "left, else one minted now",
        "headers": schemas.NO_STORE,
    },
    401: USER_RESPONSES[401],
    404: USER_RESPONSES[404],
    409: schemas.error(
        "The provider refused an access token (a user with no connected source): connect again"
    ),
    503: schemas.unavailable(
        "No valid token stored, and none minted within 10 s (the provider, Redis or the "
        "database is unavailable)"
    ),
}


ERASE_RESPONSES: dict[int | str, dict[str, Any]] = {
    204: {"description": "Erased: nothing of the user is left, but one `user.erased` event"},
    401: USER_RESPONSES[401],
    404: schemas.error(
        "No such user (a second erase too); or erasure is off (no HUMANCONNECT_API_TOKEN)"
    ),
    422: schemas.error("The clientUserId is not a valid id"),
    503: schemas.unavailable(
        "The database or Redis is unavailable: the user is not erased yet, erase again"
    ),
}


def _refusal(parts: Parts, request: Request) -> JSONResponse | None:
    """404 when the user API is off, 401 without the right bearer token, else None."""
    if parts.settings.api_token is None:
        return error(404, "not found")
    if not authorized(request, parts.settings.api_token.get_secret_value()):
        return error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
    return None


async def _stored(parts: Parts, request: Request, client_user_id: str) -> StoredUser | JSONResponse:
    """The user's stored tokens, or the refusal: 404/401 (`_refusal`), 503 with the
    database away, 404 for an unknown user."""
    if (refused := _refusal(parts, request)) is not None:
        return refused
    try:
        user = await run_in_threadpool(read_user, parts.rt, client_user_id)
    except OperationalError:
        return unavailable("database unavailable")
    return user if user is not None else error(404, "unknown user", headers=NO_STORE)


def router(parts_of: Any) -> APIRouter:
    api = APIRouter()

    @api.get(
        "/users/{client_user_id}",
        operation_id="getUser",
        summary="A user's tokens (bearer token required)",
        responses=USER_RESPONSES,
        openapi_extra={"security": [{SECURITY_SCHEME: []}]},
    )
    async def get_user(client_user_id: str, request: Request) -> JSONResponse:
        parts: Parts = parts_of(request)
        user = await _stored(parts, request, client_user_id)
        if isinstance(user, JSONResponse):
            return user
        body = {
            "clientUserId": user.client_user_id,
            "humanId": user.human_id,
            "accessToken": user.access_token,
            "publicToken": user.public_token,
            "updatedAt": user.updated_at.isoformat(),
        }
        if user.access_expires_us is not None:
            body["accessTokenExpiresAt"] = iso_from_us(user.access_expires_us)
        return JSONResponse(body, headers=NO_STORE)

    @api.get(
        "/users/{client_user_id}/access-token",
        operation_id="getAccessToken",
        summary="A valid access token for the user, minted when the stored one is about to "
        "expire (bearer token required)",
        responses=ACCESS_RESPONSES,
        openapi_extra={"security": [{SECURITY_SCHEME: []}]},
    )
    async def get_access_token(client_user_id: str, request: Request) -> JSONResponse:
        parts: Parts = parts_of(request)
        stored = await _stored(parts, request, client_user_id)
        if isinstance(stored, JSONResponse):
            return stored
        user: StoredUser | None = stored
        if not fresh(stored.access_expires_us):
            try:
                await parts.mints.mint(client_user_id, MintKind.ACCESS)
                user = await run_in_threadpool(read_user, parts.rt, client_user_id)
            except MintRefused as exc:
                return error(409, f"the provider refused an access token: {exc}")
            except (MintUnavailable, OperationalError):
                pass  # no new one: the stored one while it is valid at all
            if user is None:
                return error(404, "unknown user", headers=NO_STORE)  # erased meanwhile
            # Just minted (or the stored one): handed out while it is valid at all, whatever
            # the provider gave it to live.
            if not fresh(user.access_expires_us, margin_s=0):
                return unavailable("no valid access token, and none minted in time")
        return JSONResponse(_access_body(user or stored), headers=NO_STORE)

    @api.delete(
        "/users/{client_user_id}",
        operation_id="eraseUser",
        summary="Erase a user everywhere (bearer token required)",
        status_code=204,
        responses=ERASE_RESPONSES,
        openapi_extra={"security": [{SECURITY_SCHEME: []}]},
    )
    async def erase_user(client_user_id: str, request: Request) -> Response:
        parts: Parts = parts_of(request)
        if (refused := _refusal(parts, request)) is not None:
            return refused
        if not valid_client_user_id(client_user_id):
            return error(
                422,
                "clientUserId is not a valid id",
                {"clientUserId": "1 to 255 characters, no control characters"},
            )
        try:
            erased = await run_in_threadpool(erase, parts.rt, client_user_id)
        except (OperationalError, redis.exceptions.RedisError) as exc:
            return unavailable(f"not erased, try again ({type(exc).__name__})")
        if erased is None:
            return error(404, "unknown user", headers=NO_STORE)
        return Response(status_code=204)

    return api


def _access_body(user: StoredUser) -> dict[str, Any]:
    expires = user.access_expires_us
    return {
        "accessToken": user.access_token,
        "expiresAt": iso_from_us(expires) if expires is not None else None,
        "humanId": user.human_id,
    }
