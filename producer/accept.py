"""Accepting a finish: dedupe by session, enqueue, and only then say 202."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from producer.body import FinishBody
from producer.claims import Claim, Claims
from worker import logs
from worker.celery import EXCHANGE_TASK
from worker.clock import now, to_us
from worker.crypto import Cipher, session_hash
from worker.errors import HumanConnectError, QueueUnavailableError

log = logging.getLogger(__name__)

# How long a duplicate waits for the first request of its session to finish enqueueing.
DUPLICATE_WAIT_S = 1.5
# Longest wait for the broker to take a message. With Redis gone, publishes queue behind
# each other's connect timeouts; the contract wants the 503 within 2 s, so stop waiting.
# A publish that lands after this is harmless: the client sends again and the worker's
# session record makes the second message a no-op.
PUBLISH_DEADLINE_S = 0.8


class SessionConflict(HumanConnectError):
    """Raised when a session token arrives again with a different humanId."""


@dataclass(frozen=True)
class Accepted:
    """A finish that is safely in the queue (now, or by an earlier request)."""

    request_id: str
    state: str
    duplicate: bool


class Acceptor:
    """Turns a valid finish into a queued message, once per session token."""

    def __init__(self, claims: Claims, celery: Celery, cipher: Cipher):
        self.claims = claims
        self.celery = celery
        self.cipher = cipher
        # Celery's publish is blocking: a few threads of our own, not one per request, keep
        # it off the event loop without a crowd of threads fighting for the GIL.
        self._publisher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="publish")

    async def accept(self, body: FinishBody) -> Accepted:
        """Queue `body`, or answer with the request that already queued its session."""
        received_us = to_us(now().timestamp())
        key = session_hash(body.sessionToken)
        try:
            claim = await self._claim(key, body)
            logs.request_id.set(claim.request_id)
            if not claim.mine:
                current = await self.claims.state(claim.request_id) or {}
                return Accepted(claim.request_id, current.get("state", "queued"), duplicate=True)
        except redis.exceptions.RedisError as exc:
            raise QueueUnavailableError(f"redis unavailable: {type(exc).__name__}") from None
        # Sealed: neither the queue nor Redis ever holds a usable session token.
        sealed = self.cipher.seal(body.sessionToken)
        kwargs: dict[str, Any] = {
            "request_id": claim.request_id,
            "human_id": body.humanId,
            "client_id": body.clientId,
            "sealed_session_token": sealed,
            "received_us": received_us,
        }
        try:
            loop = asyncio.get_running_loop()
            publish = loop.run_in_executor(self._publisher, self._send, kwargs)
            await asyncio.wait_for(publish, PUBLISH_DEADLINE_S)
            await self.claims.confirm(
                key,
                claim,
                {
                    "clientId": body.clientId,
                    "sealedSessionToken": sealed,
                    "receivedUs": str(received_us),
                },
            )
        except Exception as exc:
            log.warning("enqueue failed, releasing claim: %s", type(exc).__name__)
            try:
                await self.claims.release(key, claim)
            except redis.exceptions.RedisError:
                pass  # the claim expires by itself within claims.CLAIM_TTL_S
            raise QueueUnavailableError(f"enqueue failed: {type(exc).__name__}") from None
        return Accepted(claim.request_id, "queued", duplicate=False)

    async def _claim(self, key: str, body: FinishBody) -> Claim:
        claim = await self.claims.claim(key, body.humanId)
        if not claim.mine and claim.human_id == body.humanId and claim.phase != "queued":
            waited = await self.claims.wait_confirmed(key, body.humanId, DUPLICATE_WAIT_S)
            if waited is None:
                raise QueueUnavailableError("the first request of this session is still enqueueing")
            claim = waited
        if not claim.mine and claim.human_id != body.humanId:
            raise SessionConflict("sessionToken already used with another humanId")
        return claim

    def _send(self, kwargs: dict[str, Any]) -> None:
        # Our own argument reprs: Celery shows them in logs and monitors, and computing its
        # default (saferepr of every argument) costs a fifth of the publish.
        self.celery.send_task(
            EXCHANGE_TASK,
            kwargs=kwargs,
            # The task id is the request id: Celery's own log lines then carry it too.
            task_id=kwargs["request_id"],
            retry=False,
            argsrepr="()",
            kwargsrepr=f"{{'request_id': {kwargs['request_id']!r}}}",
        )

    def close(self) -> None:
        # uvicorn has finished every request by now: nothing is being published.
        self._publisher.shutdown(wait=False, cancel_futures=True)
