"""Operations: `/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from humanconnect import events
from humanconnect.metrics import RedisCollector
from humanconnect.redis_keys import BREAKER_OPEN, QUEUES, UNACKED, WAITING_QUEUE
from humanconnect.runtime import Runtime
from humanconnect.webhooks import deliveries
from humanconnect.webhooks.sender import safe_url
from producer import schemas
from producer.finish import ACCEPT_SECONDS, FINISH_SERIES, FINISHES
from producer.state import Parts


def registry_for(rt: Runtime) -> CollectorRegistry:
    """The web's own counters (shared across processes when PROMETHEUS_MULTIPROC_DIR is set)
    plus the workers' metrics and the scrape-time gauges, read from Redis and the database."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(FINISHES)
        registry.register(ACCEPT_SECONDS)
    for outcome, reason in FINISH_SERIES:
        FINISHES.labels(outcome, reason)

    def outbox_backlog() -> float:
        with rt.db() as db:
            return float(events.backlog(db))

    def webhook_backlog() -> dict[str, float]:
        """Pending deliveries of each configured endpoint (shown without credentials)."""
        with rt.db() as db:
            pending = deliveries.backlog(db)
        return {safe_url(url): float(pending.get(url, 0)) for url in rt.settings.webhook_urls}

    registry.register(
        RedisCollector(
            rt.redis,
            {
                "humanconnect_queue_depth": (
                    "Sessions waiting in the queues (both)",
                    lambda: float(sum(rt.redis.llen(q) for q in QUEUES)),
                ),
                "humanconnect_waiting_queue_depth": (
                    "Sessions a person waits on, waiting in their own queue",
                    lambda: float(rt.redis.llen(WAITING_QUEUE)),
                ),
                "humanconnect_queue_unacked": (
                    "Messages delivered to workers and not yet acknowledged",
                    lambda: float(rt.redis.hlen(UNACKED)),
                ),
                "humanconnect_breaker_open": (
                    "1 while the upstream circuit breaker is open (calls paused), else 0",
                    lambda: float(rt.redis.pttl(BREAKER_OPEN) > 0),
                ),
                "humanconnect_upstream_limit_rps": (
                    "HUMANAPI_MAX_RPS: upstream calls per second, shared by every worker",
                    lambda: rt.settings.max_rps,
                ),
                "humanconnect_outbox_backlog": ("Events not yet relayed", outbox_backlog),
                "humanconnect_webhook_backlog": (
                    "Webhook deliveries not yet delivered or failed, per endpoint",
                    webhook_backlog,
                ),
            },
        )
    )
    return registry


def router(parts_of: Any, registry: CollectorRegistry) -> APIRouter:
    api = APIRouter()

    @api.get(
        "/healthz",
        operation_id="healthz",
        summary="The process is up",
        # Not validated on the way out: only documented, like every other route's.
        response_model=None,
        responses={200: {"model": schemas.Health, "description": "While the process serves"}},
    )
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        operation_id="readyz",
        summary="Redis and the database are reachable",
        responses={
            200: {"model": schemas.Readiness, "description": "Both are reachable"},
            503: {"model": schemas.Readiness, "description": "At least one is not"},
        },
    )
    async def readyz(request: Request) -> JSONResponse:
        parts: Parts = parts_of(request)
        checks = {"redis": await _redis_ready(parts.aredis)}
        checks["database"] = await run_in_threadpool(_database_ready, parts.rt)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    @api.get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics",
        # Response's media type is None, so FastAPI adds no application/json of its own.
        response_class=Response,
        responses={
            200: {
                "description": "The Prometheus text exposition format",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return api


async def _redis_ready(r: AsyncRedis) -> str:
    try:
        await r.ping()
        return "ok"
    except Exception as exc:  # any failure means not ready
        return type(exc).__name__


def _database_ready(rt: Runtime) -> str:
    try:
        with rt.db() as db:
            db.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # any failure means not ready
        return type(exc).__name__
