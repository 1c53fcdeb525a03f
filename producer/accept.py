"""Accepting a finish: dedupe by session and enqueue in one atomic call, then say 202."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis

from humanconnect import logs
from humanconnect.crypto import Cipher, session_hash
from humanconnect.redis_keys import WAITING_QUEUE
from humanconnect.request import ExchangeRequest
from humanconnect.states import RequestState
from humanconnect.status_records import new_request_id
from producer.body import FinishBody
from producer.claims import Claims
from producer.errors import QueueUnavailableError, RedisFullError, SessionConflict
from producer.message import RECEIVED_PLACEHOLDER, MessageBuilder

# Longest wait for Redis to answer the accept call. With Redis gone, calls queue behind
# each other's connect timeouts; a finish that can't be queued owes its 503 within 2 s,
# so stop waiting.
# A call that lands after this is harmless: the client sends again and gets the request
# it created as a duplicate (202, same requestId).
ACCEPT_DEADLINE_S = 1.0


@dataclass(frozen=True)
class Accepted:
    """A finish that is safely in the queue (now, or by an earlier request)."""

    request_id: str
    state: str
    duplicate: bool


class Acceptor:
    """Turns a valid finish into a queued message, once per session token."""

    def __init__(self, claims: Claims, messages: MessageBuilder, cipher: Cipher):
        self.claims = claims
        self.messages = messages
        self.cipher = cipher

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
        )
        message = self.messages.exchange(request)
        waiting_message = self.messages.exchange(request, WAITING_QUEUE) if waiting else None
        try:
            claim = await asyncio.wait_for(
                self.claims.accept(
                    session_hash(body.sessionToken),
                    request,
                    message,
                    waiting_message,
                    client=client,
                    user=expected_client_user_id,
                ),
                ACCEPT_DEADLINE_S + self.claims.replica_wait_s,
            )
            logs.request_id.set(claim.request_id)
            if claim.mine:
                return Accepted(claim.request_id, RequestState.QUEUED, duplicate=False)
            if claim.human_id != body.humanId:
                raise SessionConflict("sessionToken already used with another humanId")
            current = await self.claims.state(claim.request_id) or {}
        except redis.exceptions.ResponseError as exc:
            if not _out_of_memory(exc):
                raise QueueUnavailableError(f"redis unavailable: {type(exc).__name__}") from None
            # Redis at its maxmemory (noeviction) refused the script's first write (Redis 7
            # checks there; every check comes before any write, so nothing was written): full,
            # like a backlog at its cap.
            raise RedisFullError("redis is out of memory (maxmemory)") from None
        except (redis.exceptions.RedisError, TimeoutError) as exc:
            raise QueueUnavailableError(f"redis unavailable: {type(exc).__name__}") from None
        return Accepted(claim.request_id, current.get("state", RequestState.QUEUED), duplicate=True)


def _out_of_memory(exc: redis.exceptions.ResponseError) -> bool:
    """Redis's OOM refusal: redis-py's own class on Redis 7, a script error naming it on 6."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(
        exc
    )
