"""`POST /connect/token`: the token the provider's current Connect opens with, for the
ticket's user (the contract's "The provider's current Connect flow").

Handed out again from Redis while it has more than 60 s left; otherwise a worker mints one
(producer/mints.py), ahead of queued work, while the person waits at most 10 s.
"""

from __future__ import annotations

import math
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from humanconnect.minting import CONNECT_MARGIN_S, ConnectToken, MintKind, parse_connect_token
from humanconnect.redis_keys import connect_token
from humanconnect.tickets import TicketError
from producer import schemas
from producer.accept import within
from producer.body import BadRequest, decode, read_limited
from producer.errors import error, unavailable
from producer.mints import MintLimited, MintRefused, MintUnavailable
from producer.state import Parts

NO_STORE = {"Cache-Control": "no-store"}

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": schemas.ConnectToken,
        "description": "The token to open Connect with",
        "headers": schemas.NO_STORE,
    },
    401: schemas.error(
        "The connect ticket is missing (`ticket missing`), expired (`ticket expired`) or "
        "otherwise not valid (`ticket invalid`)",
        {"WWW-Authenticate": schemas.header("`Bearer`", required=True)},
    ),
    404: schemas.error("Tickets are off (no HUMANCONNECT_TICKET_KEY): this flow needs them"),
    413: schemas.error("The body is over 16 KiB"),
    429: schemas.error(
        "This ticket user has started as many mints as HUMANCONNECT_FINISH_LIMIT_PER_USER "
        "allows (a token handed out again, or a mint already under way, is never refused)",
        schemas.RETRY_AFTER,
    ),
    502: schemas.error("The provider refused to mint a token (its reason in `error`)"),
    503: schemas.unavailable("No token within 10 s: the provider or Redis is unavailable"),
}


def router(parts_of: Any) -> APIRouter:
    api = APIRouter()

    @api.post(
        "/connect/token",
        operation_id="connectToken",
        summary="A token to open the provider's current Connect with (ticket required)",
        responses=RESPONSES,
        openapi_extra={
            "parameters": [
                {
                    "name": "ticket",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "A connect ticket, where `Authorization: Bearer` can't be sent",
                }
            ],
        },
    )
    async def mint_connect_token(request: Request) -> JSONResponse:
        parts: Parts = parts_of(request)
        if parts.tickets.key is None:
            return error(404, "not found")
        try:
            raw = await read_limited(request)
        except BadRequest as exc:
            return JSONResponse(exc.body, status_code=exc.status)
        # The body is optional: a ticket may ride in it, as in a finish.
        try:
            data = decode(raw) if raw.strip() else None
        except BadRequest:
            data = None
        try:
            ticket = parts.tickets.ticket(request, data)
        except TicketError as exc:
            return error(401, exc.reason, headers={"WWW-Authenticate": "Bearer"})
        kept = await _kept(parts, ticket.user, CONNECT_MARGIN_S)
        if kept is None:
            try:
                await parts.mints.mint(ticket.user, MintKind.CONNECT, ticket.email)
            except MintRefused as exc:
                return error(502, f"the provider refused to mint a token: {exc}")
            except MintLimited as exc:
                # A mint that ended since this ask looked may have kept a token: hand it out.
                kept = await _kept(parts, ticket.user, CONNECT_MARGIN_S)
                if kept is not None:
                    return _answer(kept)
                retry_after = str(max(1, math.ceil(exc.retry_after_s)))
                return error(
                    429,
                    "too many tokens for this user, try again later",
                    headers={"Retry-After": retry_after},
                )
            except MintUnavailable:
                return unavailable("no token yet, try again")
            # Just minted for this request: handed out whatever its lifetime.
            kept = await _kept(parts, ticket.user, 0)
            if kept is None:  # minted and gone again (Redis restarted between): ask again
                return unavailable("no token yet, try again")
        return _answer(kept)

    return api


def _answer(kept: ConnectToken) -> JSONResponse:
    return JSONResponse(
        {
            "token": kept.token,
            "tokenType": str(kept.type),
            "expiresIn": max(0, math.floor(kept.left_s())),
            "humanId": kept.human_id or None,
        },
        headers=NO_STORE,
    )


async def _kept(parts: Parts, user: str, margin_s: float) -> ConnectToken | None:
    """The user's kept token while it has more than `margin_s` left."""
    try:
        raw = await within(parts.aredis.hgetall(connect_token(user)), 1.0)
    except (redis.exceptions.RedisError, TimeoutError):
        return None
    kept = parse_connect_token(raw, parts.rt.cipher)
    return kept if kept is not None and kept.left_s() > margin_s else None
