"""The `web` process: a thin HTTP API that validates, enqueues and answers at once."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from celery import Celery
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from producer.accept import Acceptor, SessionConflict
from producer.body import BadRequest, check_content_type, parse, read_limited
from producer.claims import Claims
from worker import logs, migrate
from worker.celery import celery_config
from worker.crypto import Cipher
from worker.errors import QueueUnavailableError
from worker.models import Session, User
from worker.runtime import Runtime, async_redis_client
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RETRY_AFTER_S = "2"


def _error(
    status_code: int,
    error: str,
    fields: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": error, "fields": fields or {}}, status_code=status_code, headers=headers
    )


def status_body(record: dict[str, str], request_id: str, cipher: Cipher) -> dict[str, Any]:
    """The public status of a request: never an accessToken, the publicToken decrypted."""
    body: dict[str, Any] = {
        "requestId": request_id,
        "status": record.get("state", "queued"),
        "humanId": record.get("humanId"),
    }
    if body["status"] == "succeeded":
        body["clientUserId"] = record.get("clientUserId")
        sealed = record.get("publicToken")
        body["publicToken"] = cipher.open(sealed) if sealed else None
    if body["status"] == "failed":
        body["error"] = record.get("error") or "failed"
    return body


def status_from_db(rt: Runtime, request_id: str) -> dict[str, str] | None:
    """Fallback when Redis no longer has the record (expired, or a Redis without AOF)."""
    with rt.db() as db:
        row = db.scalar(select(Session).where(Session.request_id == request_id))
        if row is None:
            return None
        record = {"state": row.state, "humanId": row.human_id}
        if row.client_user_id:
            record["clientUserId"] = row.client_user_id
            sealed = db.scalar(select(User.public_token).where(User.human_id == row.human_id))
            if sealed:
                record["publicToken"] = sealed
        if row.error:
            record["error"] = row.error
        return record


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the web app; `settings` defaults to the environment's."""
    settings = settings or get_settings()
    rt = Runtime(settings)
    # Its own Celery app, configured from `settings`: it only ever sends by task name.
    celery_app = Celery("humanconnect-web")
    celery_app.conf.update(celery_config(settings))
    parts: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settings.require(secret=False)
        logs.install(as_json=settings.log_json)
        if settings.auto_migrate:
            await run_in_threadpool(migrate.upgrade, settings.database_url)
        assert settings.redis_url is not None
        # Created inside the server's event loop, which the async client is bound to.
        aredis = async_redis_client(settings.redis_url)
        parts["claims"] = Claims(aredis, settings.status_ttl_s)
        parts["acceptor"] = Acceptor(parts["claims"], celery_app, rt.cipher)
        try:
            yield
        finally:
            parts["acceptor"].close()
            await aredis.aclose()

    api = FastAPI(title="humanconnect", version="0.1.0", lifespan=lifespan)
    api.state.runtime = rt

    @api.post(
        "/connect/finish",
        status_code=202,
        summary="Finish a Human Connect session: validate, enqueue, answer at once",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/FinishBody"}}
                },
            }
        },
    )
    async def finish(request: Request) -> JSONResponse:
        try:
            raw = await read_limited(request)
            check_content_type(request)
            body = parse(raw)
        except BadRequest as exc:
            return JSONResponse(exc.body, status_code=exc.status)
        if body.clientId != settings.effective_client_id:
            return _error(422, "clientId is not this app's", {"clientId": "does not match"})
        try:
            accepted = await parts["acceptor"].accept(body)
        except SessionConflict:
            return _error(
                409, "sessionToken already used with another humanId", {"humanId": "conflict"}
            )
        except QueueUnavailableError as exc:
            log.warning("finish refused: %s", exc)
            return _error(
                503, "queue unavailable, try again", headers={"Retry-After": RETRY_AFTER_S}
            )
        url = f"/connect/finish/{accepted.request_id}"
        return JSONResponse(
            {"requestId": accepted.request_id, "status": accepted.state, "statusUrl": url},
            status_code=202,
            headers={"Location": url},
        )

    @api.get("/connect/finish/{request_id}", summary="The status of a finish request")
    async def finish_status(request_id: str) -> JSONResponse:
        if not REQUEST_ID.match(request_id):
            return _error(404, "unknown requestId")
        try:
            record = await parts["claims"].state(request_id)
        except redis.exceptions.RedisError:
            record = None
        if record is None:
            try:
                record = await run_in_threadpool(status_from_db, rt, request_id)
            except OperationalError:
                return _error(
                    503, "status store unavailable", headers={"Retry-After": RETRY_AFTER_S}
                )
        if record is None:
            return _error(404, "unknown requestId")
        return JSONResponse(status_body(record, request_id, rt.cipher))

    @api.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Redis and the database are reachable")
    async def readyz() -> JSONResponse:
        checks = {"redis": await _redis_ready(parts["claims"].r)}
        checks["database"] = await run_in_threadpool(_database_ready, rt)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    # Document the body schema (the handler reads the raw body to enforce the size limit).
    original_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = original_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {})["FinishBody"] = (
                _finish_schema()
            )
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _finish_schema() -> dict[str, Any]:
    value = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_-]+$"}
    return {
        "type": "object",
        "required": ["humanId", "clientId", "sessionToken"],
        "properties": {"humanId": value, "clientId": value, "sessionToken": value},
    }


async def _redis_ready(r: AsyncRedis) -> str:
    try:
        await r.ping()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return type(exc).__name__


def _database_ready(rt: Runtime) -> str:
    try:
        with rt.db() as db:
            db.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return type(exc).__name__
