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

from humanconnect.erasure import erase
from humanconnect.users import read_user, valid_client_user_id
from producer import schemas
from producer.bearer import bearer_token
from producer.errors import error, unavailable
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
        if (refused := _refusal(parts, request)) is not None:
            return refused
        try:
            user = await run_in_threadpool(read_user, parts.rt, client_user_id)
        except OperationalError:
            return unavailable("database unavailable")
        if user is None:
            return error(404, "unknown user", headers=NO_STORE)
        return JSONResponse(
            {
                "clientUserId": user.client_user_id,
                "humanId": user.human_id,
                "accessToken": user.access_token,
                "publicToken": user.public_token,
                "updatedAt": user.updated_at.isoformat(),
            },
            headers=NO_STORE,
        )

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
