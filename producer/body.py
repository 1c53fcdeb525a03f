"""The finish request body: reading it within limits, and validating it."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.requests import ClientDisconnect, Request

MAX_BODY_BYTES = 16 * 1024

Value = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$", strict=True)
]


class BadRequest(Exception):
    """Raised when a finish body is refused; carries the HTTP status and the JSON body."""

    def __init__(self, status: int, error: str, fields: dict[str, str] | None = None):
        super().__init__(error)
        self.status = status
        self.body = {"error": error, "fields": fields or {}}


class FinishBody(BaseModel):
    """A `sessionTokenObject`. Unknown fields are dropped; camelCase wins over snake_case."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    humanId: Value = Field(validation_alias=AliasChoices("humanId", "human_id"))
    clientId: Value = Field(validation_alias=AliasChoices("clientId", "client_id"))
    sessionToken: Value = Field(validation_alias=AliasChoices("sessionToken", "session_token"))
    #: A connect ticket, for clients that can't send `Authorization: Bearer` (see the
    #: contract's "Connect tickets"); read before validation, documented here.
    ticket: str | None = Field(None, max_length=4096)

    def __repr__(self) -> str:
        return f"FinishBody(humanId={self.humanId!r}, clientId={self.clientId!r})"


_MESSAGES = {
    "missing": "required",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most 128 characters",
    "string_pattern_mismatch": "must use only A-Z, a-z, 0-9, '_' and '-'",
}


async def read_limited(request: Request) -> bytes:
    """The body, refusing (413) anything over 16 KiB without reading it whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY_BYTES:
                raise BadRequest(413, "body too large", {"body": f"at most {MAX_BODY_BYTES} bytes"})
        except ValueError:
            raise BadRequest(400, "invalid Content-Length") from None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BadRequest(413, "body too large", {"body": f"at most {MAX_BODY_BYTES} bytes"})
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(400, "body incomplete") from None
    return b"".join(chunks)


def check_content_type(request: Request) -> None:
    """415 unless the body is declared as application/json."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise BadRequest(
            415, "Content-Type must be application/json", {"Content-Type": media or "missing"}
        )


def decode(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 otherwise."""
    try:
        data: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "body must be a JSON object")
    return data


def validate(data: dict[str, Any]) -> FinishBody:
    """The finish body from a decoded object; 400 with one message per offending field."""
    try:
        return FinishBody.model_validate(data)
    except ValidationError as exc:
        fields: dict[str, str] = {}
        for err in exc.errors():
            loc = err.get("loc") or ("body",)
            name = str(loc[0])
            name = {
                "human_id": "humanId",
                "client_id": "clientId",
                "session_token": "sessionToken",
            }.get(name, name)
            fields.setdefault(name, _MESSAGES.get(err["type"], err["msg"]))
        raise BadRequest(400, "invalid fields", fields) from None
