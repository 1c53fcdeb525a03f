"""Kombu's Redis transport with three changes: a worker survives losing Redis under load,
and a primary refusing writes for want of replicas; and a message costs no new Redis client.

On a broker loss Celery's consumer first collects the connection (which detaches the
transport from it) and then closes it. If the first close of the channel was cut short (it
was waiting on BRPOP when Redis went away), the second close tries to put the worker's
unacknowledged messages back through a connection pool it can no longer build: Kombu raises
AttributeError ('NoneType' object has no attribute 'hostname'), which is not a connection
error, so Celery stops the worker ("Unrecoverable error"). Seen in the Redis chaos scenario.

Here that case is a connection error, which the close path expects: the worker reconnects,
and the unacknowledged messages stay in Redis's unacked set, where the visibility timeout
hands them out again.

Kombu also builds a new `redis.Redis` around its pool for every note of a message in flight
and every ack (`Channel.conn_or_acquire`), and a client's construction copies redis-py's
table of reply parsers: a share of a draining worker's Python time that a py-spy profile of
the drain benchmark made plain (issue 15). A client holds no connection of its own (each
command takes one from the pool), so one client per pool serves every thread.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from humanconnect import redis_clients

#: This class, by Kombu's name for it.
TRANSPORT = "worker.broker:Transport"
SENTINEL_TRANSPORT = "worker.broker:SentinelTransport"


class Channel(kombu_redis.Channel):
    _sync_client: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        # A new pool (after a reconnect) gets a new client.
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("broker connection already collected")
        params: dict[str, Any] = super()._connparams(asynchronous)
        # A primary refusing writes for want of replicas is a connection error to Kombu (it
        # reconnects until the replicas are back), not a reply that ends the worker.
        params["parser_class"] = redis_clients.Parser
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """Kombu's Sentinel channel (its pool asks the Sentinels for the primary) with the same
    two changes: its pool is built from `_connparams` too, so a collected connection is a
    connection error here as well (on every failover's close, not only a crash's)."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Make redis://, rediss:// and sentinel:// URLs use these transports in this process
    (call it before the first connection: Kombu caches what an alias resolves to;
    worker.celery does it at import). Through the aliases, not `broker_transport`: Kombu
    turns TLS on by the alias `rediss`, which a `broker_transport` class would override."""
    TRANSPORT_ALIASES["redis"] = TRANSPORT
    TRANSPORT_ALIASES["rediss"] = TRANSPORT
    TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
