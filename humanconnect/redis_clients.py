"""Every Redis client a process opens, built from the settings in this one place.

Redis is either one address (REDIS_URL) or a primary that Sentinels name (REDIS_SENTINELS
and REDIS_SENTINEL_MASTER). With Sentinels, a client asks them for the primary whenever it
opens a connection, and drops a connection the old primary answers as a replica (`READONLY`,
or `UNBLOCKED` for a blocked pop), so every process follows a failover without a restart.
Celery's broker and RedBeat take the same target in their own terms (`broker`, `redbeat`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.backoff import NoBackoff
from redis.connection import DefaultParser
from redis.retry import Retry
from redis.sentinel import Sentinel

from humanconnect.errors import ConfigError
from humanconnect.settings import Settings

# Short socket timeouts: a Redis that is down must turn into a 503 within 2 seconds.
CONNECT_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 1.0
# One immediate retry (a pooled connection the server closed, or a primary that Sentinel has
# just replaced), no more: redis-py's default of three with exponential backoff holds a
# finish for seconds while Redis is down.
RETRIES = 1
ASYNC_POOL_SIZE = 200
#: Celery's and RedBeat's URL when none is set (an import of the app that never connects).
LOCAL_URL = "redis://127.0.0.1:6379/0"
# Sentinels answer from memory; one that takes longer is away, and the next is asked.
SENTINEL_TIMEOUT_S = 0.5


class WritesRefused(redis.exceptions.ResponseError, redis.exceptions.ConnectionError):
    """`NOREPLICAS`: the primary has fewer replicas than its `min-replicas-to-write` (the
    Sentinel deployment sets 1) and refuses every write. To a process that is Redis away, to
    be waited out like an outage: as a plain ResponseError it ended Celery workers
    ("Unrecoverable error") and counted against a task's few tries for the unforeseen. Still
    a ResponseError, so redis-py raises it as a reply (and a pipeline reports it as one)."""


class Parser(DefaultParser):  # type: ignore[misc,valid-type]
    """redis-py's reply parser, with `NOREPLICAS` raised as WritesRefused."""

    EXCEPTION_CLASSES = {**DefaultParser.EXCEPTION_CLASSES, "NOREPLICAS": WritesRefused}


class _AsyncBlockingSentinelPool(AsyncSentinelPool, AsyncBlockingConnectionPool):
    """Sentinel's pool (connections to whichever node is primary) with the blocking pool's
    wait for a free connection under a burst."""


def _common(settings: Settings, **extra: Any) -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        # A WAIT for replicas (producer/claims.py, exchange.py) is answered after up to its
        # timeout.
        "socket_timeout": SOCKET_TIMEOUT_S + settings.replica_wait_s,
        "health_check_interval": 15,
        **extra,
    }


def _secret(settings: Settings, name: str) -> str | None:
    value = getattr(settings, name)
    return value.get_secret_value() if value is not None else None


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """REDIS_SENTINELS as (host, port) pairs (the settings checked their shape)."""
    pairs = (address.rpartition(":") for address in settings.redis_sentinels)
    return [(host.strip("[]"), int(port)) for host, _, port in pairs]


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "password": _secret(settings, "redis_sentinel_password"),
    }


def _url(settings: Settings) -> str:
    if settings.redis_url is None:
        raise ConfigError("REDIS_URL or REDIS_SENTINELS is required")
    return settings.redis_url


def _master(settings: Settings) -> str:
    if settings.redis_sentinel_master is None:  # the settings refuse this; for the type
        raise ConfigError("REDIS_SENTINEL_MASTER is required with REDIS_SENTINELS")
    return settings.redis_sentinel_master


def client(settings: Settings, *, decode: bool = False) -> redis.Redis:
    """A Redis client that fails fast instead of hanging when the server is away."""
    options = _common(
        settings, retry=Retry(NoBackoff(), RETRIES), decode_responses=decode, parser_class=Parser
    )
    if not settings.redis_sentinels:
        return redis.Redis.from_url(_url(settings), **options)
    sentinel = Sentinel(sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings))
    return sentinel.master_for(
        _master(settings),
        password=_secret(settings, "redis_password"),
        db=settings.redis_db,
        **options,
    )


def async_client(settings: Settings) -> AsyncRedis:
    """The same fail-fast client for asyncio code (the web), decoding to str. Its pool makes a
    request wait up to 0.5 s for a free connection under a burst instead of failing at once
    (the default pool raises past 100 connections)."""
    options = _common(
        settings,
        max_connections=ASYNC_POOL_SIZE,
        timeout=0.5,
        retry=AsyncRetry(NoBackoff(), RETRIES),
        decode_responses=True,
    )
    if not settings.redis_sentinels:
        pool = AsyncBlockingConnectionPool.from_url(_url(settings), **options)
        return AsyncRedis(connection_pool=pool)
    sentinel = AsyncSentinel(
        sentinel_addresses(settings), sentinel_kwargs=_sentinel_kwargs(settings)
    )
    return sentinel.master_for(
        _master(settings),
        connection_pool_class=_AsyncBlockingSentinelPool,
        password=_secret(settings, "redis_password"),
        db=settings.redis_db,
        **options,
    )


def broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it adds for the target: Kombu's
    `sentinel://` transport, one URL per Sentinel, the primary's name an option."""
    if not settings.redis_sentinels:
        return settings.redis_url or LOCAL_URL, {}
    password = _secret(settings, "redis_password")
    auth = f":{quote(password, safe='')}@" if password else ""
    url = ";".join(
        f"sentinel://{auth}{_host(host)}:{port}/{settings.redis_db}"
        for host, port in sentinel_addresses(settings)
    )
    return url, {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": _sentinel_kwargs(settings),
    }


def redbeat(settings: Settings) -> tuple[str, dict[str, Any]]:
    """RedBeat's URL and options: `redis-sentinel://` and the Sentinels in its options."""
    options: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 5.0}
    if not settings.redis_sentinels:
        return settings.redis_url or LOCAL_URL, options
    options.pop("socket_connect_timeout")  # RedBeat's Sentinel branch takes only socket_timeout
    return "redis-sentinel://", {
        **options,
        "sentinels": sentinel_addresses(settings),
        "service_name": settings.redis_sentinel_master,
        "password": _secret(settings, "redis_password"),
        "db": settings.redis_db,
        "sentinel_kwargs": _sentinel_kwargs(settings),
    }


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def as_text(value: bytes | str) -> str:
    """A reply as text, from a client that decodes (the web's) or one that doesn't."""
    return value.decode() if isinstance(value, bytes) else value
