"""The `web` process: a thin HTTP API that validates, enqueues and answers at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from celery import Celery
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from producer import finish, ops, users
from producer.state import Parts
from worker import logs, migrate
from worker.celery import celery_config
from worker.runtime import Runtime
from worker.settings import Settings, get_settings


def _parts(request: Request) -> Parts:
    parts: Parts = request.app.state.parts
    return parts


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the web app; `settings` defaults to the environment's."""
    settings = settings or get_settings()
    rt = Runtime(settings)
    # Its own Celery app, configured from `settings`: it only builds exchange messages for the
    # accept script (producer/message.py), by task name.
    celery_app = Celery("humanconnect-web")
    celery_app.conf.update(celery_config(settings))

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        settings.require(secret=False)
        logs.install(as_json=settings.log_json)
        if settings.auto_migrate:
            await run_in_threadpool(migrate.upgrade, settings.database_url)
        # Created inside the server's event loop, which the async Redis client is bound to.
        api.state.parts = await Parts.start(settings, rt, celery_app)
        try:
            yield
        finally:
            await api.state.parts.stop()

    api = FastAPI(title="humanconnect", version="0.1.0", lifespan=lifespan)
    api.include_router(finish.router(_parts))
    api.include_router(users.router(_parts))
    api.include_router(ops.router(_parts, ops.registry_for(rt)))

    # Document the finish body (the handler reads the raw body to enforce the size limit).
    original_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = original_openapi()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["FinishBody"] = _finish_schema()
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
