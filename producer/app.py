"""The `web` process: a thin HTTP API that validates, enqueues and answers at once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from humanconnect import logs
from humanconnect.errors import ConfigError
from humanconnect.queue import sender
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings, get_settings
from humanconnect.storage import migrate
from producer import browser, connect_token, direct, finish, ops, users, warm
from producer.body import FinishBody
from producer.close_payload import ClosePayload
from producer.cors import BrowserCORS
from producer.state import Parts

log = logging.getLogger(__name__)


def _parts(request: Request) -> Parts:
    parts: Parts = request.app.state.parts
    return parts


async def _with_every_allowed_method(request: Request, exc: Exception) -> Response:
    """FastAPI's answer to an HTTP error, but a 405's `Allow` names every method the API
    documents for the path: the router names only those of the first route whose path
    matched (`/users/{id}` has a GET route and a DELETE route)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        path = request.scope["path"]
        allowed = {
            method.upper()
            for template, operations in request.app.openapi()["paths"].items()
            if compile_path(template)[0].match(path)
            for method in operations
        }
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
    return await http_exception_handler(request, exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the web app; `settings` defaults to the environment's."""
    settings = settings or get_settings()
    rt = Runtime(settings)
    # Its own Celery app, configured from `settings`: it only builds exchange messages for the
    # accept script (producer/message.py), by task name.
    celery_app = sender(settings, "humanconnect-web")

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        settings.require(secret=False)
        logs.install(as_json=settings.log_json)
        if settings.ticket_key is None:
            log.warning(
                "HUMANCONNECT_TICKET_KEY is not set: any client can finish a session for any "
                "user (set it and send connect tickets; see docs/integrating/tickets.md)"
            )
        if settings.auto_migrate:
            await run_in_threadpool(migrate.upgrade, settings.database_url)
        # Created inside the server's event loop, which the async Redis client is bound to.
        api.state.parts = await Parts.start(settings, rt, celery_app)
        warm.prime(api, rt.cipher)
        try:
            yield
        finally:
            await api.state.parts.stop()

    api = FastAPI(title="humanconnect", version="0.1.0", lifespan=lifespan)
    api.add_exception_handler(StarletteHTTPException, _with_every_allowed_method)
    finish_routes = finish.router(_parts)
    api.include_router(finish_routes)
    api.include_router(connect_token.router(_parts))
    api.include_router(users.router(_parts))
    api.include_router(ops.router(_parts, ops.registry_for(rt)))
    api.include_router(browser.router(_parts, settings))
    # Innermost of the middleware (added first): CORS and the proxy headers still apply.
    finish_endpoint = direct.endpoint_of(finish_routes.routes, "POST", "/connect/finish")
    api.add_middleware(
        direct.DirectRoute, method="POST", path="/connect/finish", endpoint=finish_endpoint
    )
    if settings.cors_origins:
        api.add_middleware(BrowserCORS, origins=settings.cors_origins)
    if settings.trusted_proxies:
        # The client is the nearest X-Forwarded-For address that is not a trusted proxy (the
        # finish limits count it). Uvicorn's own copy of this runs off: see the Procfile.
        api.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)

    original_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = _document(original_openapi(), settings)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _document(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """FastAPI's document, completed with what it can't see in the handlers' signatures."""
    components = schema.setdefault("components", {})
    # The finish handler reads the raw body itself (to enforce the size limit), so FastAPI
    # knows nothing of it.
    components.setdefault("schemas", {})["FinishBody"] = _finish_schema(settings)
    # The current flow's body, with its nested models as components of their own.
    close = ClosePayload.model_json_schema(ref_template="#/components/schemas/{model}")
    components["schemas"].update(close.pop("$defs", {}))
    components["schemas"]["ClosePayload"] = close
    components.setdefault("securitySchemes", {}).update(users.SECURITY_SCHEMES)
    _drop_default_422(schema)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            # The route's own status code comes first otherwise (202 before 201).
            operation["responses"] = dict(sorted(operation.get("responses", {}).items()))
    return schema


def _finish_schema(settings: Settings) -> dict[str, Any]:
    """producer.body.FinishBody's schema, its clientId narrowed to this app's own: the handler
    answers any other with 422. The clientId is public (every page using the app carries it)."""
    schema = FinishBody.model_json_schema()
    try:
        client_id = settings.effective_client_id
    except ConfigError:
        # Not configured: the app won't start, but its document can still be read.
        return schema
    schema["properties"]["clientId"]["const"] = client_id
    return schema


def _drop_default_422(schema: dict[str, Any]) -> None:
    """Remove FastAPI's 422 HTTPValidationError: no route lets FastAPI validate its input
    (path parameters are plain strings, bodies are read raw), so none ever answers it."""
    default = {"$ref": "#/components/schemas/HTTPValidationError"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            answer = responses.get("422", {})
            if answer.get("content", {}).get("application/json", {}).get("schema") == default:
                del responses["422"]
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
