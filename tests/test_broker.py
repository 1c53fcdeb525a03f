"""The worker's Redis transport survives the close that follows a lost broker, and a primary
refusing writes for want of replicas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from kombu import Connection
from kombu.common import ignore_errors

from humanconnect import redis_clients
from humanconnect.settings import Settings
from tests.support.servers import RedisServer
from worker.broker import TRANSPORT, Channel


@pytest.mark.parametrize(
    "transport",
    [
        TRANSPORT,
        # Kombu's own: when this starts passing, Kombu has fixed it and worker/broker.py can go.
        pytest.param(
            "kombu.transport.redis:Transport",
            marks=pytest.mark.xfail(raises=AttributeError, strict=True, reason="Kombu"),
        ),
    ],
)
def test_closing_a_collected_channel_is_a_connection_error(
    redis_url: str, redis_client: redis.Redis, transport: str
) -> None:
    conn = Connection(redis_url, transport=transport)
    queue = conn.SimpleQueue("test-broker")
    try:
        # Given a message delivered to this consumer and not yet acknowledged
        queue.put({"n": 1})
        queue.get(timeout=5)
        assert redis_client.hlen("unacked") == 1
        # When the connection has been collected (as Celery's consumer does on a broker
        # loss) and the channel, whose first close was cut short, is closed again
        conn.transport.client = None
        # Then the close fails as a connection error, which Celery's close path ignores
        # (Kombu's own transport raises AttributeError here, and Celery stops the worker)
        ignore_errors(conn, conn.default_channel.close)
        # And the message waits in Redis's unacked set for the visibility timeout
        assert redis_client.hlen("unacked") == 1
    finally:
        redis_client.delete("test-broker")


def test_redis_urls_use_it_and_rediss_keeps_tls() -> None:
    """Configuring a Celery app as the worker's is puts it behind both URL schemes, and TLS
    still follows `rediss://` (Kombu decides TLS by that name)."""
    from celery import Celery
    from kombu.transport import redis as kombu_redis

    from humanconnect.settings import Settings
    from worker.broker import SentinelTransport, Transport
    from worker.celery import configure

    configure(Celery("probe"), Settings.model_validate({}))

    plain = Connection("redis://127.0.0.1:6379/0")
    secure = Connection("rediss://127.0.0.1:6380/0")
    assert plain.transport_cls == "redis" and secure.transport_cls == "rediss"
    assert type(plain.transport) is Transport and type(secure.transport) is Transport
    assert not plain.ssl
    assert secure.ssl
    # Through Sentinels too, with Kombu's Sentinel pool under the same two changes.
    sentinel = Connection(
        "sentinel://127.0.0.1:26379/0", transport_options={"master_name": "hc-primary"}
    )
    assert type(sentinel.transport) is SentinelTransport
    assert issubclass(sentinel.transport.Channel, kombu_redis.SentinelChannel)


def test_a_message_costs_no_new_redis_client(redis_url: str, redis_client: redis.Redis) -> None:
    """Noting a message in flight and acking it reuse one client per pool (Kombu builds one
    for each: 15 % of a draining worker's Python time); a new pool gets a new client."""
    conn = Connection(redis_url, transport=TRANSPORT)
    queue = conn.SimpleQueue("test-broker-client")
    built: list[object] = []
    original = redis.Redis.__init__

    def counting(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    try:
        queue.put({"n": 0})
        queue.get(timeout=5).ack()  # the channel's clients exist from here on
        redis.Redis.__init__ = counting  # type: ignore[method-assign]
        for n in range(1, 6):
            queue.put({"n": n})
            message = queue.get(timeout=5)
            message.ack()
        assert built == []
        assert redis_client.hlen("unacked") == 0
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        first = channel._create_client()
        channel._pool = None  # as after a reconnect
        assert channel._create_client() is not first
    finally:
        redis.Redis.__init__ = original  # type: ignore[method-assign]
        queue.close()
        conn.release()


def test_a_primary_refusing_writes_is_a_connection_error_to_kombu_and_our_clients(
    own_redis: RedisServer, make_settings: Callable[..., Settings]
) -> None:
    """`min-replicas-to-write` with no replica: Redis answers every write `NOREPLICAS`.
    Kombu (the worker's broker channel) and our own clients see a connection error, which
    they wait out, not a reply error (which ended the worker)."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("min-replicas-to-write", 1)
    conn = Connection(own_redis.url, transport=TRANSPORT)
    ours = redis_clients.client(make_settings(REDIS_URL=own_redis.url))
    try:
        with pytest.raises(redis.exceptions.ResponseError, match="NOREPLICAS"):
            admin.set("k", "v")  # a stock client: a reply error
        with pytest.raises(tuple(conn.connection_errors)):
            conn.SimpleQueue("test-broker").put({"n": 1})  # declaring it writes already
        with pytest.raises(redis.exceptions.ConnectionError):
            ours.set("k", "v")
        assert ours.get("k") is None  # reads go on
    finally:
        admin.config_set("min-replicas-to-write", 0)
        conn.release()
        ours.close()
