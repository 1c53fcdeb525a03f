"""The names every process agrees on for a request's state and a failure's kind."""

from __future__ import annotations

from enum import StrEnum


class RequestState(StrEnum):
    """Where a finish request stands; stored in the `sessions` table and the status record."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """True once nothing will change the request any more."""
        return self in FINAL


FINAL = frozenset({RequestState.SUCCEEDED, RequestState.FAILED})


class ErrorKind(StrEnum):
    """Why a session failed; `sessions.error_kind` and the exchanges metric's outcome."""

    #: The upstream stayed unavailable for the whole retry window (`failed --retry` re-queues).
    TRANSIENT = "transient"
    #: The upstream refused, or answered a success we cannot use.
    PERMANENT = "permanent"
    #: An earlier call got no answer and the upstream then refused the used token.
    ANSWER_LOST = "answer_lost"
    #: Our own bug: the task's retries for an unforeseen exception ran out.
    INTERNAL = "internal"
    #: The upstream's answer named another user than the connect ticket vouched for.
    CLIENT_USER_MISMATCH = "client_user_mismatch"
    #: The user was erased while the finish was queued or running: nothing was stored.
    ERASED = "erased"
