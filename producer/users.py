"""`GET /users/{clientUserId}`: token read-back, behind a bearer token."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from producer.errors import error, unavailable
from producer.state import Parts
from worker.users import read_user

NO_STORE = {"Cache-Control": "no-store"}


def authorized(request: Request, expected: str) -> bool:
    """Only the Authorization header counts (a token in the URL is never accepted), compared
    in constant time."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


def router(parts_of: Any) -> APIRouter:
    api = APIRouter()

    @api.get("/users/{client_user_id}", summary="A user's tokens (bearer token required)")
    async def get_user(client_user_id: str, request: Request) -> JSONResponse:
        parts: Parts = parts_of(request)
        if parts.settings.api_token is None:
            return error(404, "not found")
        if not authorized(request, parts.settings.api_token.get_secret_value()):
            return error(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
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

    return api
