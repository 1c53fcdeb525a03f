"""The per-process objects a worker or producer needs, built once from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy.orm import sessionmaker

from humanconnect.crypto import Cipher
from humanconnect.settings import Settings
from humanconnect.storage.db import session_factory
from humanconnect.webhooks.deliveries import Targets

# Short socket timeouts: a Redis that is down must turn into a 503 within 2 seconds.
REDIS_CONNECT_TIMEOUT_S = 0.5
REDIS_SOCKET_TIMEOUT_S = 1.0
# One immediate retry (a pooled connection the server closed), no more: redis-py's default
# of three with exponential backoff holds a finish for seconds while Redis is down.
REDIS_RETRIES = 1
ASYNC_POOL_SIZE = 200


def redis_client(url: str) -> redis.Redis:
    """A Redis client that fails fast instead of hanging when the server is away."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        health_check_interval=15,
        retry=Retry(NoBackoff(), REDIS_RETRIES),
    )


def async_redis_client(url: str) -> AsyncRedis:
    """The same fail-fast client for asyncio code (the producer), decoding to str. Its pool
    makes a request wait up to 0.5 s for a free connection under a burst instead of failing
    at once (the default pool raises past 100 connections)."""
    pool = AsyncBlockingConnectionPool.from_url(
        url,
        max_connections=ASYNC_POOL_SIZE,
        timeout=0.5,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        health_check_interval=15,
        retry=AsyncRetry(NoBackoff(), REDIS_RETRIES),
        decode_responses=True,
    )
    return AsyncRedis(connection_pool=pool)


@dataclass
class Runtime:
    """Lazily built clients, shared by the threads of one process."""

    settings: Settings

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_client(self.settings.required_redis_url)

    @cached_property
    def cipher(self) -> Cipher:
        return Cipher(self.settings.key_list())

    @cached_property
    def webhook_targets(self) -> Targets:
        """Where this process's events are delivered (none unless webhooks are configured)."""
        return Targets.from_settings(self.settings)

    @cached_property
    def db(self) -> sessionmaker:
        return session_factory(self.settings.database_url)
