"""The exchange request: what the web queues, the reconciler re-sends, `failed --retry`
re-queues and the `exchange_session` task reads. Its one definition.

It travels two ways: as the task's keyword arguments (the Celery message), and as fields of
the request's status record in Redis, from which a lost message can be sent again. The
session token is sealed (Fernet) in both; a `Job` is the same request in a worker's hands,
its session token opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Flow(StrEnum):
    """Which Connect flow a finish came through (the contract's two)."""

    #: The provider's guide: the browser hands back a sessionTokenObject to exchange.
    TOKENS = "tokens"
    #: The provider's current flow: the server fetches a `type: "access"` token for the
    #: ticket's user. No session token exists: the request's stands in for one.
    ACCESS = "access"


#: What stands in for the session token of an access finish, sealed in its message like a
#: real one: unique per request (its lock and `sessions` row are per finish), and never a
#: real token (those are `[A-Za-z0-9_-]`; a `:` can't occur in one).
ACCESS_TOKEN_PREFIX = "access:"


@dataclass(frozen=True)
class ExchangeRequest:
    """One accepted finish, as queued."""

    request_id: str
    human_id: str
    client_id: str
    sealed_session_token: str
    #: When the web received the session (µs since the epoch): newest session wins.
    received_us: int
    #: When the retry window opened, if not at `received_us` (an operator re-queued it).
    window_start_us: int | None = None
    #: The clientUserId the finish's connect ticket vouched for, if it carried one.
    expected_client_user_id: str | None = None
    #: An access finish's connected sources' names, comma-separated (for its event).
    connected_sources: str = ""
    #: The W3C traceparent of the finish's accept, with tracing on: a re-send continues its
    #: trace (humanconnect/tracing.py). Kept in the status record, never a task argument.
    trace_context: str | None = None

    def task_kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments; the optional ones only when set, as older messages
        had them."""
        kwargs: dict[str, Any] = {
            "request_id": self.request_id,
            "human_id": self.human_id,
            "client_id": self.client_id,
            "sealed_session_token": self.sealed_session_token,
            "received_us": self.received_us,
        }
        if self.window_start_us is not None:
            kwargs["window_start_us"] = self.window_start_us
        if self.expected_client_user_id is not None:
            kwargs["expected_client_user_id"] = self.expected_client_user_id
        if self.connected_sources:
            kwargs["connected_sources"] = self.connected_sources
        return kwargs

    def record_fields(self) -> dict[str, str]:
        """The status-record fields a re-send needs (see humanconnect/jobs/reconcile.py)."""
        fields = {
            "humanId": self.human_id,
            "clientId": self.client_id,
            "sealedSessionToken": self.sealed_session_token,
            "receivedUs": str(self.received_us),
        }
        if self.window_start_us is not None:
            fields["windowStartUs"] = str(self.window_start_us)
        if self.expected_client_user_id is not None:
            fields["expectedClientUserId"] = self.expected_client_user_id
        if self.connected_sources:
            fields["connectedSources"] = self.connected_sources
        if self.trace_context is not None:
            fields["traceparent"] = self.trace_context
        return fields

    @classmethod
    def from_record(cls, request_id: str, record: Mapping[str, str]) -> ExchangeRequest | None:
        """The request a status record describes, or None when it lacks what a re-send needs
        (it ended, and its sealed token was dropped)."""
        try:
            window = record.get("windowStartUs")
            return cls(
                request_id=request_id,
                human_id=record["humanId"],
                client_id=record["clientId"],
                sealed_session_token=record["sealedSessionToken"],
                received_us=int(record["receivedUs"]),
                window_start_us=int(window) if window else None,
                expected_client_user_id=record.get("expectedClientUserId") or None,
                connected_sources=record.get("connectedSources", ""),
                trace_context=record.get("traceparent") or None,
            )
        except (KeyError, ValueError):
            return None

    def __repr__(self) -> str:
        return f"ExchangeRequest(request_id={self.request_id!r}, human_id={self.human_id!r})"


def access_token_for(request_id: str) -> str:
    """The stand-in session token of an access finish."""
    return ACCESS_TOKEN_PREFIX + request_id


@dataclass(frozen=True)
class Job:
    """One accepted finish, as the producer queued it (the session token already opened)."""

    request_id: str
    human_id: str
    client_id: str
    session_token: str
    received_us: int
    #: When the retry window opened: the receive time, or when an operator re-queued it.
    window_start_us: int | None = None
    #: The clientUserId the connect ticket vouched for; the upstream's answer must match.
    expected_client_user_id: str | None = None
    #: A person waits on this finish (it came through the waiting queue): its upstream
    #: calls take the process's next rate-limit slots.
    waiting: bool = False
    connected_sources: str = ""

    @classmethod
    def opened(cls, request: ExchangeRequest, session_token: str, *, waiting: bool = False) -> Job:
        """The job of a queued request whose session token has been opened (an access
        finish's is `access_token_for` its request)."""
        return cls(
            request_id=request.request_id,
            human_id=request.human_id,
            client_id=request.client_id,
            session_token=session_token,
            received_us=request.received_us,
            window_start_us=request.window_start_us,
            expected_client_user_id=request.expected_client_user_id,
            waiting=waiting,
            connected_sources=request.connected_sources,
        )

    @property
    def flow(self) -> Flow:
        """Read from the token, so every path that rebuilds a job (a retry of a failure, the
        reconciler) keeps its flow."""
        if self.session_token.startswith(ACCESS_TOKEN_PREFIX):
            return Flow.ACCESS
        return Flow.TOKENS

    def __repr__(self) -> str:
        return f"Job(request_id={self.request_id!r}, human_id={self.human_id!r})"
