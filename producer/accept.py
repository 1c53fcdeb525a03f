"""Accepting a finish: dedupe by session, enqueue, and only then say 202."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from celery import Celery

from producer.body import FinishBody
from worker import status
from worker.celery import EXCHANGE_TASK
from worker.clock import now
from worker.crypto import session_hash
from worker.errors import HumanConnectError, QueueUnavailableError
from worker.exchange import to_us
from worker.runtime import Runtime

log = logging.getLogger(__name__)

# How long a duplicate waits for the first request of its session to finish enqueueing.
DUPLICATE_WAIT_S = 1.5


class SessionConflict(HumanConnectError):
    """Raised when a session token arrives again with a different humanId."""


@dataclass(frozen=True)
class Accepted:
    """A finish that is safely in the queue (now, or by an earlier request)."""

    request_id: str
    state: str
    duplicate: bool


def accept(rt: Runtime, celery: Celery, body: FinishBody) -> Accepted:
    """Queue `body` once per session token; a duplicate gets the first request's id."""
    received_us = to_us(now().timestamp())
    key = session_hash(body.sessionToken)
    ttl = rt.settings.status_ttl_s
    try:
        claim = status.claim(rt.redis, key, body.humanId, ttl)
        if not claim.mine and claim.human_id == body.humanId and claim.phase != "queued":
            waited = status.wait_confirmed(rt.redis, key, body.humanId, ttl, DUPLICATE_WAIT_S)
            if waited is None:
                raise QueueUnavailableError("first request of this session is still enqueueing")
            claim = waited
        if not claim.mine:
            if claim.human_id != body.humanId:
                raise SessionConflict("sessionToken already used with another humanId")
            current = status.get_state(rt.redis, claim.request_id) or {}
            return Accepted(claim.request_id, current.get("state", "queued"), duplicate=True)
    except redis.exceptions.RedisError as exc:
        raise QueueUnavailableError(f"redis unavailable: {type(exc).__name__}") from None

    try:
        celery.send_task(
            EXCHANGE_TASK,
            kwargs={
                "request_id": claim.request_id,
                "human_id": body.humanId,
                "client_id": body.clientId,
                # Sealed: the queue never holds a usable session token.
                "sealed_session_token": rt.cipher.seal(body.sessionToken),
                "received_us": received_us,
            },
            retry=False,
        )
        status.confirm(rt.redis, key, claim, ttl)
    except Exception as exc:
        log.warning("enqueue failed, releasing claim: %s", type(exc).__name__)
        try:
            status.release(rt.redis, key, claim)
        except redis.exceptions.RedisError:
            pass  # the claim expires by itself within status.CLAIM_TTL_S
        raise QueueUnavailableError(f"enqueue failed: {type(exc).__name__}") from None
    return Accepted(claim.request_id, "queued", duplicate=False)
