"""Accepting a finish: dedupe by session and enqueue in one atomic call, then say 202."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import redis

from humanconnect import logs, tracing
from humanconnect.crypto import Cipher, session_hash
from humanconnect.redis_keys import WAITING_QUEUE, access_claim, session_claim
from humanconnect.request import ExchangeRequest, access_token_for
from humanconnect.states import RequestState
from humanconnect.status_records import new_request_id
from producer.body import FinishBody
from producer.claims import Claims
from producer.errors import (
    NotReplicatedError,
    QueueUnavailableError,
    RedisFullError,
    SessionConflict,
)
from producer.message import RECEIVED_PLACEHOLDER, MessageBuilder

# Longest wait for Redis to answer the accept call. With Redis gone, calls queue behind
# each other's connect timeouts; a finish that can't be queued owes its 503 within 2 s,
# so stop waiting.
# A call that lands after this is harmless: the client sends again and gets the request
# it created as a duplicate (202, same requestId).
ACCEPT_DEADLINE_S = 1.0

T = TypeVar("T")
#: Marks what an access finish's claim names: its connected sources, not a humanId.
ACCESS_PAYLOAD = "sources:"

# Calls given up on and still cancelling: held so the loop does not collect them mid-way.
_abandoned: set[asyncio.Task[object]] = set()


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`awaitable`'s result, or TimeoutError after `seconds` without waiting for the call to
    finish cancelling: `asyncio.wait_for` does wait, and a redis-py call cancelled mid-read
    against a frozen primary may take its own time to tear down its connection, which measured
    pushed a 503 past 2 s in the frozen-primary chaos."""
    task: asyncio.Task[T] = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:  # the request itself was cancelled: take the call with it
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    _abandoned.add(task)
    task.add_done_callback(_settled)
    raise TimeoutError(f"no answer within {seconds} s")


def _settled(task: asyncio.Task[object]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a late failure of a call given up on is not news


@dataclass(frozen=True)
class Accepted:
    """A finish that is safely in the queue (now, or by an earlier request)."""

    request_id: str
    #: The request's state; "" for a duplicate whose status record has expired and whose
    #: claim does not say how it ended (the caller asks the database).
    state: str
    duplicate: bool


class Acceptor:
    """Turns a valid finish into a queued message, once per session token."""

    def __init__(self, claims: Claims, messages: MessageBuilder, cipher: Cipher):
        self.claims = claims
        self.messages = messages
        self.cipher = cipher

    @tracing.accept_span
    async def accept(
        self,
        body: FinishBody,
        *,
        expected_client_user_id: str | None = None,
        waiting: bool = False,
        client: str = "",
    ) -> Accepted:
        """Queue `body`, or answer with the request that already queued its session.
        `expected_client_user_id` is the user a connect ticket vouched for; `waiting` says
        a person waits on the answer (the waiting queue, while its share allows); `client`
        is the caller's address. Both count against the finish limits (OverLimitError)."""
        # Sealed: neither the queue nor Redis ever holds a usable session token.
        request = ExchangeRequest(
            request_id=new_request_id(),
            human_id=body.humanId,
            client_id=body.clientId,
            sealed_session_token=self.cipher.seal(body.sessionToken),
            # Redis's clock, set by the accept script: one clock for every web host.
            received_us=RECEIVED_PLACEHOLDER,
            expected_client_user_id=expected_client_user_id,
            trace_context=tracing.traceparent(),
        )
        claim_key = session_claim(session_hash(body.sessionToken))
        return await self._accept(request, claim_key, waiting=waiting, client=client)

    @tracing.accept_span
    async def accept_access(
        self,
        client_user_id: str,
        client_id: str,
        connected_sources: str,
        *,
        waiting: bool = False,
    ) -> Accepted:
        """Queue the access fetch of a current-flow finish, or answer with the one of this
        user still queued or running (one claim per user: finishes coalesce)."""
        request_id = new_request_id()
        request = ExchangeRequest(
            request_id=request_id,
            human_id="",  # the provider names it when the token is fetched
            client_id=client_id,
            sealed_session_token=self.cipher.seal(access_token_for(request_id)),
            received_us=RECEIVED_PLACEHOLDER,
            expected_client_user_id=client_user_id,
            connected_sources=connected_sources,
            trace_context=tracing.traceparent(),
        )
        # The claim names what was connected: a resend of this payload after its fetch ended
        # is the same finish; another payload then is a new one.
        return await self._accept(
            request,
            access_claim(client_user_id),
            waiting=waiting,
            client="",
            claim_names=ACCESS_PAYLOAD + connected_sources,
        )

    async def _accept(
        self,
        request: ExchangeRequest,
        claim_key: str,
        *,
        waiting: bool,
        client: str,
        claim_names: str | None = None,
    ) -> Accepted:
        expected_client_user_id = request.expected_client_user_id
        message = self.messages.exchange(request)
        waiting_message = self.messages.exchange(request, WAITING_QUEUE) if waiting else None
        clock = asyncio.get_running_loop().time
        deadline = clock() + ACCEPT_DEADLINE_S + self.claims.replica_wait_s
        try:
            for attempt in range(2):
                claim = await within(
                    self.claims.accept(
                        claim_key,
                        request,
                        message,
                        waiting_message,
                        client=client,
                        user=expected_client_user_id,
                        claim_names=claim_names,
                    ),
                    deadline - clock(),
                )
                ended_elsewise = claim_names is not None and claim.final and not claim.same_human
                if not ended_elsewise or attempt:
                    break
                # An access finish of another payload after this user's last one ended:
                # a new finish. That claim goes (only if it is still the one read).
                await within(self.claims.drop(claim_key, claim.raw), deadline - clock())
            logs.request_id.set(claim.request_id)
            if claim.mine:
                return Accepted(claim.request_id, RequestState.QUEUED, duplicate=False)
            if not claim.same_human and claim_names is None:
                raise SessionConflict("sessionToken already used with another humanId")
            # Under the same deadline: a duplicate owes its answer as soon as a new finish.
            current = await within(self.claims.state(claim.request_id), deadline - clock()) or {}
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith("NOREPLICAS"):
                # A primary short of the replicas its `min-replicas-to-write` asks for refused
                # the script's first write (checked before any write, like the OOM below).
                raise NotReplicatedError("the primary has too few replicas to write") from None
            if not _out_of_memory(exc):
                raise QueueUnavailableError(f"redis unavailable: {type(exc).__name__}") from None
            # Redis at its maxmemory (noeviction) refused the script's first write (Redis 7
            # checks there; every check comes before any write, so nothing was written): full,
            # like a backlog at its cap.
            raise RedisFullError("redis is out of memory (maxmemory)") from None
        except (redis.exceptions.RedisError, TimeoutError) as exc:
            raise QueueUnavailableError(f"redis unavailable: {type(exc).__name__}") from None
        # A record gone while its claim lasts is a finished request's (an unfinished one's
        # record outlives its claim): never answered `queued` from here.
        state = current.get("state") or (claim.final or "")
        return Accepted(claim.request_id, state, duplicate=True)


def _out_of_memory(exc: redis.exceptions.ResponseError) -> bool:
    """Redis's OOM refusal: redis-py's own class on Redis 7, a script error naming it on 6."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(
        exc
    )
