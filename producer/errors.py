"""The one shape of every error body: `{"error": ..., "fields": {...}}`."""

from __future__ import annotations

from fastapi.responses import JSONResponse

RETRY_AFTER_S = "2"


def error(
    status_code: int,
    message: str,
    fields: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "fields": fields or {}}, status_code=status_code, headers=headers
    )


def unavailable(message: str) -> JSONResponse:
    return error(503, message, headers={"Retry-After": RETRY_AFTER_S})
