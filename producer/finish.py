"""`POST /connect/finish` and `GET /connect/finish/{requestId}`."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from dataclasses import replace
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from humanconnect.crypto import Cipher
from humanconnect.runtime import Runtime
from humanconnect.states import FINAL, RequestState
from humanconnect.storage import sessions, tokens
from humanconnect.tickets import TicketError
from producer.accept import Accepted
from producer.body import (
    BadRequest,
    FinishBody,
    check_content_type,
    decode,
    read_limited,
    validate,
)
from producer.close_payload import ClosePayload, is_close_payload, validate_close
from producer.errors import (
    BacklogFullError,
    NotReplicatedError,
    OverLimitError,
    QueueUnavailableError,
    RedisFullError,
    SessionConflict,
    error,
    unavailable,
)
from producer.finish_doc import FINISH_OPENAPI, FINISH_RESPONSES, STATUS_RESPONSES
from producer.state import Parts
from producer.waiters import requested_wait

log = logging.getLogger(__name__)
# How a refusal names the source that is over its limit.
_SOURCE_NAMES = {"ip": "address", "user": "user"}
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

FINISHES = Counter(
    "humanconnect_finishes",
    "Finish requests by outcome (accepted, duplicate, refused) and reason",
    ["outcome", "reason"],
    registry=None,
)
#: Shown at 0 from a web's start: Prometheus sees no increase in a series' first sample, so
#: an alert on the first refusal of a kind needs the series there before it.
FINISH_SERIES = [("accepted", ""), ("duplicate", "")] + [
    ("refused", r)
    for r in ("queue_unavailable", "backlog_full", "redis_oom", "limit_ip", "limit_user", "ticket")
]
# The two series every finish counts, looked up once.
_ACCEPTED, _DUPLICATES = FINISHES.labels("accepted", ""), FINISHES.labels("duplicate", "")
ACCEPT_SECONDS = Histogram(
    "humanconnect_accept_seconds",
    "From a finish's arrival to its accept (before any Prefer: wait), in seconds",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=None,
)


def status_body(record: dict[str, str], request_id: str, cipher: Cipher) -> dict[str, Any]:
    """The public status of a request: never an accessToken, the publicToken decrypted."""
    body: dict[str, Any] = {
        "requestId": request_id,
        "status": record.get("state", RequestState.QUEUED),
        # An access finish learns its humanId only from the provider.
        "humanId": record.get("humanId") or None,
    }
    if body["status"] == RequestState.SUCCEEDED:
        body["clientUserId"] = record.get("clientUserId")
        sealed = record.get("publicToken")
        body["publicToken"] = cipher.open(sealed) if sealed else None
    if body["status"] == RequestState.FAILED:
        body["error"] = record.get("error") or "failed"
    return body


def status_from_db(rt: Runtime, request_id: str) -> dict[str, str] | None:
    """Fallback when Redis no longer has the record (expired, or a Redis without AOF)."""
    with rt.db() as db:
        row = sessions.by_request(db, request_id)
        if row is None:
            return None
        record = {"state": row.state, "humanId": row.human_id}
        if row.client_user_id:
            record["clientUserId"] = row.client_user_id
            sealed = tokens.sealed_public_token(db, row.human_id)
            if sealed:
                record["publicToken"] = sealed
        if row.error:
            record["error"] = row.error
        return record


def client_address(request: Request) -> str:
    """The address a finish limit counts: the peer (or, behind HUMANCONNECT_TRUSTED_PROXIES,
    the client the proxy names); an IPv6 client by its /64, which one host holds whole."""
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP (a unix socket, a test client): counted as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _refused(status_code: int, reason: str, body: dict[str, Any], **headers: str) -> JSONResponse:
    FINISHES.labels("refused", reason).inc()
    return JSONResponse(body, status_code=status_code, headers=headers or None)


def _no_ticket(reason: str) -> JSONResponse:
    """The 401 of a finish without a valid ticket where it needs one."""
    return _refused(
        401, "ticket", {"error": reason, "fields": {}}, **{"WWW-Authenticate": "Bearer"}
    )


def router(parts_of: Any) -> APIRouter:
    """The finish routes; `parts_of(request)` gives the app's shared `Parts`."""
    api = APIRouter()

    @api.post(
        "/connect/finish",
        operation_id="finish",
        status_code=202,
        summary="Finish a Human Connect session: validate, enqueue, answer at once",
        responses=FINISH_RESPONSES,
        openapi_extra=FINISH_OPENAPI,
    )
    async def finish(request: Request) -> JSONResponse:
        started = time.monotonic()
        parts: Parts = parts_of(request)
        # Refusals in the documented order: 413, 401, 415, 400, 422 (429 in the accept call).
        try:
            raw = await read_limited(request)
        except BadRequest as exc:
            return _refused(exc.status, str(exc.status), exc.body)
        # Decoded before the ticket check (a body field may carry the ticket), refused after it.
        try:
            decoded: dict[str, Any] | BadRequest = decode(raw)
        except BadRequest as exc:
            decoded = exc
        try:
            user = parts.tickets.user(request, decoded if isinstance(decoded, dict) else None)
        except TicketError as exc:
            return _no_ticket(exc.reason)
        try:
            check_content_type(request)
            if isinstance(decoded, BadRequest):
                raise decoded
            body: FinishBody | ClosePayload = (
                validate_close(decoded) if is_close_payload(decoded) else validate(decoded)
            )
        except BadRequest as exc:
            return _refused(exc.status, str(exc.status), exc.body)
        # The query string parsed only when there is one (most finishes carry none).
        query_wait = request.query_params.get("wait") if request.scope.get("query_string") else None
        wait_s = requested_wait(request.headers.get("prefer"), query_wait)
        if isinstance(body, ClosePayload):
            # The provider's current flow: the ticket is the only word on whose it is.
            if user is None:
                return _no_ticket("ticket missing")
            if body.nothing_connected:
                FINISHES.labels("nothing_connected", "").inc()
                return JSONResponse({"status": "nothing_connected"})
            accepting = parts.acceptor.accept_access(
                user,
                parts.settings.effective_client_id,
                body.connected_names(),
                waiting=bool(wait_s),
            )
        elif body.clientId != parts.settings.effective_client_id:
            return _refused(
                422,
                "client_id",
                {"error": "clientId is not this app's", "fields": {"clientId": "does not match"}},
            )
        else:
            accepting = parts.acceptor.accept(
                body,
                expected_client_user_id=user,
                waiting=bool(wait_s),
                # Only a finish without a ticket counts against its address (claims.py).
                client=client_address(request) if not user else "",
            )
        try:
            accepted = await accepting
        except SessionConflict:
            return _refused(
                409,
                "conflict",
                {
                    "error": "sessionToken already used with another humanId",
                    "fields": {"humanId": "conflict"},
                },
            )
        except QueueUnavailableError as exc:
            log.warning("finish refused: %s", exc)
            FINISHES.labels("refused", "queue_unavailable").inc()
            return unavailable("queue unavailable, try again")
        except NotReplicatedError as exc:
            # Maybe queued all the same: a resend is answered as its duplicate, once the
            # replicas hold it.
            log.warning("finish refused: %s", exc)
            return _refused(
                503,
                "not_replicated",
                {
                    "error": "not replicated yet, try again",
                    "reason": "not_replicated",
                    "fields": {},
                },
                **{"Retry-After": "1"},
            )
        except OverLimitError as exc:
            return _refused(
                429,
                f"limit_{exc.source}",
                {
                    "error": f"too many finishes from this {_SOURCE_NAMES[exc.source]}, "
                    "try again later",
                    "fields": {},
                },
                **{"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
            )
        except BacklogFullError as exc:
            # Shed, not failed: the process is fine and /readyz stays 200; the metric says why
            # (the cap, or a Redis out of memory).
            full = isinstance(exc, RedisFullError)
            if full:
                log.warning("finish shed: %s", exc)
            FINISHES.labels("refused", "redis_oom" if full else "backlog_full").inc()
            return unavailable("too many sessions queued, try again")
        if not accepted.state:
            stored = await _record(parts, accepted.request_id)
            if isinstance(stored, JSONResponse):
                return stored  # the database is away: the client sends again, still a duplicate
            # No row either: only a claim written before claims were marked, whose row
            # retention has deleted.
            state = (stored or {}).get("state", RequestState.QUEUED)
            accepted = replace(accepted, state=state)
        (_DUPLICATES if accepted.duplicate else _ACCEPTED).inc()
        ACCEPT_SECONDS.observe(time.monotonic() - started)
        if wait_s is not None:
            return await _answer_after_wait(parts, accepted, started + wait_s, wait_s)
        return _accepted(accepted.request_id, accepted.state)

    @api.get(
        "/connect/finish/{request_id}",
        operation_id="finishStatus",
        summary="The status of a finish request",
        responses=STATUS_RESPONSES,
    )
    async def finish_status(request_id: str, request: Request) -> JSONResponse:
        if not REQUEST_ID.match(request_id):
            return error(404, "unknown requestId")
        parts: Parts = parts_of(request)
        record = await _record(parts, request_id)
        if isinstance(record, JSONResponse):
            return record
        if record is None:
            return error(404, "unknown requestId")
        return JSONResponse(status_body(record, request_id, parts.rt.cipher))

    return api


async def _record(parts: Parts, request_id: str) -> dict[str, str] | JSONResponse | None:
    """The request's status record, else (expired, or Redis away) its `sessions` row; a 503
    when neither store answers."""
    try:
        record = await parts.claims.state(request_id)
    except redis.exceptions.RedisError:
        record = None
    if record is None:
        try:
            record = await run_in_threadpool(status_from_db, parts.rt, request_id)
        except OperationalError:
            return unavailable("status store unavailable")
    return record


def _accepted(request_id: str, state: str, **extra: str) -> JSONResponse:
    url = f"/connect/finish/{request_id}"
    return JSONResponse(
        {"requestId": request_id, "status": state, "statusUrl": url},
        status_code=202,
        headers={"Location": url, **extra},
    )


async def _answer_after_wait(
    parts: Parts, accepted: Accepted, deadline: float, wait_s: float
) -> JSONResponse:
    """201 if the exchange succeeds before `deadline`, 422 if it fails, else 202."""
    applied = {"Preference-Applied": f"wait={wait_s:g}"}
    request_id = accepted.request_id
    record: dict[str, str] | None = None
    async with parts.waiters.waiting(request_id) as done:
        while True:
            # The database too: a duplicate's record may have expired with its request
            # finished (HUMANCONNECT_FINISHED_STATUS_TTL_S).
            found = await _record(parts, request_id)
            record = found if isinstance(found, dict) else None
            state = (record or {}).get("state")
            remaining = deadline - time.monotonic()
            if state in FINAL or accepted.state in FINAL or remaining <= 0:
                break
            # Woken by the worker's publish; the one-second slices only cover a missed
            # message (the listener reconnecting), at most N reads of one Redis hash.
            try:
                await asyncio.wait_for(asyncio.shield(done), min(1.0, remaining))
            except TimeoutError:
                pass
    if record and record.get("state") == RequestState.SUCCEEDED:
        return JSONResponse(
            status_body(record, request_id, parts.rt.cipher), status_code=201, headers=applied
        )
    if record and record.get("state") == RequestState.FAILED:
        return JSONResponse(
            status_body(record, request_id, parts.rt.cipher), status_code=422, headers=applied
        )
    return _accepted(request_id, (record or {}).get("state", accepted.state), **applied)
