"""The web's errors: the ones only a finish raises, and the one shape of every error body,
`{"error": ..., "fields": {...}}`."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from humanconnect.errors import HumanConnectError

RETRY_AFTER_S = "2"


class QueueUnavailableError(HumanConnectError):
    """Raised when Redis cannot take the work right now."""


class BacklogFullError(HumanConnectError):
    """Raised when the queued backlog is at HUMANCONNECT_MAX_BACKLOG: new work is shed."""


class RedisFullError(BacklogFullError):
    """Raised when Redis, at its maxmemory with noeviction, refuses new work: shed too."""


class NotReplicatedError(HumanConnectError):
    """Raised when fewer replicas than HUMANCONNECT_REDIS_MIN_REPLICAS hold an accept in
    time. The session may be queued all the same: a resend is answered as its duplicate."""


class OverLimitError(HumanConnectError):
    """Raised when a finish's source (client address, ticket user) is over its limit."""

    def __init__(self, source: str, retry_after_s: float):
        super().__init__(f"over the per-{source} finish limit")
        #: `ip` or `user`.
        self.source = source
        self.retry_after_s = retry_after_s


class SessionConflict(HumanConnectError):
    """Raised when a session token arrives again with a different humanId."""


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
