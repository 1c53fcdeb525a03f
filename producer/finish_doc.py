"""What the finish routes document beyond their models: their answers, with headers, and
the finish's request body and parameters (the body is read by the endpoint itself, so FastAPI
can't infer them). Kept apart so `producer/finish.py` reads as the handlers alone."""

from __future__ import annotations

from typing import Any

from producer import schemas
from producer.body import MAX_BODY_BYTES
from producer.schemas import header


def _applied(description: str, *, required: bool = False) -> dict[str, Any]:
    return header(description, required=required, example="wait=5")


FINISH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": schemas.NothingConnected,
        "description": "A current-flow close payload with no source connected: nothing queued",
    },
    201: {
        "model": schemas.Succeeded,
        "description": "With `Prefer: wait=N`: the exchange succeeded within the wait",
        "headers": {"Preference-Applied": _applied("The wait applied", required=True)},
    },
    202: {
        "model": schemas.Accepted,
        "description": "Queued (or a duplicate of a session already accepted): poll `Location`",
        "headers": {
            "Location": header("The status URL, as in `statusUrl`", required=True),
            "Preference-Applied": _applied("With `Prefer: wait=N`: the wait, which ran out"),
        },
    },
    400: schemas.error("Not a JSON object with valid fields, or a broken body"),
    401: schemas.error(
        "With HUMANCONNECT_TICKET_KEY set: the connect ticket is missing (`ticket missing`), "
        "expired (`ticket expired`) or otherwise not valid (`ticket invalid`)",
        {"WWW-Authenticate": header("`Bearer`", required=True)},
    ),
    409: schemas.error("The sessionToken was already used with another humanId"),
    429: schemas.error(
        "Over a finish limit: this ticket user's (HUMANCONNECT_FINISH_LIMIT_PER_USER) or, "
        "for a finish without a valid ticket, this client address's "
        "(HUMANCONNECT_FINISH_LIMIT_PER_IP); a duplicate is never refused",
        {"Retry-After": header("Seconds until a finish from this source is taken", required=True)},
    ),
    413: schemas.error(f"The body is over {MAX_BODY_BYTES} bytes"),
    415: schemas.error("Content-Type is not application/json"),
    422: {
        "model": schemas.Error | schemas.Failed,
        "description": "clientId is not this app's (an Error); or, with `Prefer: wait=N`, "
        "the exchange failed within the wait (the request's status)",
        "headers": {"Preference-Applied": _applied("With `Prefer: wait=N`: the wait")},
    },
    503: schemas.unavailable("The queue is unavailable, or full (HUMANCONNECT_MAX_BACKLOG)"),
}
STATUS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": schemas.FinishStatus, "description": "The request's status"},
    404: schemas.error("No request has this id"),
    503: schemas.unavailable("Not in Redis (or Redis is down), and the database is unavailable"),
}


#: The finish's body (either form) and its `Prefer`, `wait` and `ticket` parameters.
FINISH_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/FinishBody"},
                        {"$ref": "#/components/schemas/ClosePayload"},
                    ]
                }
            }
        },
    },
    "parameters": [
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "example": "wait=5"},
            "description": "RFC 7240 `wait=N`, in seconds (at most 30; 10 when larger "
            "or unreadable): 201, or 422, if the exchange ends within the wait, else "
            "202 as without it. Other preferences are ignored",
        },
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "example": "25"},
            "description": "The same as `Prefer: wait=N`, for clients that can't send "
            "the header (the provider's iOS and Android SDKs post to a fixed authURL); "
            "the header wins when both are given",
        },
        {
            "name": "ticket",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "A connect ticket, for clients that can't send "
            "`Authorization: Bearer` (the provider's mobile SDKs)",
        },
    ],
}
