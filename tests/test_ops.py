"""Read-back, readiness and metrics, in process against real Redis and databases."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from humanconnect.redis_clients import SOCKET_TIMEOUT_S
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings
from humanconnect.users import get_user_tokens
from producer.app import create_app
from tests import factories
from tests.support.env import HANG_GUARD, timed, wait_for
from tests.support.servers import RedisServer, TcpProxy

API_TOKEN = "op-token-0123456789abcdef"


@pytest.fixture
def stored(make_settings: Callable[..., Settings], sqlite_url: str) -> tuple[Settings, str]:
    settings = make_settings(DATABASE_URL=sqlite_url, HUMANCONNECT_API_TOKEN=API_TOKEN)
    return settings, factories.stored_user(Runtime(settings), public_token="p" * 32)


@pytest.fixture
def client(stored: tuple[Settings, str], make_client: Callable[..., TestClient]) -> TestClient:
    """conftest.py's app with the read-back token, on the database `stored` wrote to."""
    return make_client(HUMANCONNECT_API_TOKEN=API_TOKEN)


def test_read_back_with_the_right_token(client: TestClient) -> None:
    """The right bearer token reads the decrypted tokens, not cacheable."""
    resp = client.get("/users/user@example.com", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["accessToken"] == "access-secret-1" and body["publicToken"] == "p" * 32
    assert body["humanId"] == "a" * 24 and body["updatedAt"]
    assert resp.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/users/user@example.com", {}),
        ("/users/user@example.com", {"Authorization": "Bearer wrong-token"}),
        ("/users/user@example.com", {"Authorization": f"Basic {API_TOKEN}"}),
        ("/users/user@example.com", {"Authorization": f"Bearer {API_TOKEN}x"}),
        (f"/users/user@example.com?access_token={API_TOKEN}", {}),
        (f"/users/user@example.com?token={API_TOKEN}", {}),
    ],
    ids=["none", "wrong", "basic", "longer", "query access_token", "query token"],
)
def test_read_back_refuses_without_the_header_token(
    client: TestClient, path: str, headers: dict
) -> None:
    """No, wrong, or URL-borne tokens get 401 and no token in the body."""
    resp = client.get(path, headers=headers)
    assert resp.status_code == 401
    assert "access-secret-1" not in resp.text
    assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_read_back_unknown_user_is_404(client: TestClient) -> None:
    """An unknown clientUserId is 404 even with the right token."""
    resp = client.get("/users/nobody", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert resp.status_code == 404


def test_read_back_disabled_without_a_configured_token(
    make_settings: Callable[..., Settings], stored: tuple[Settings, str], redis_client: redis.Redis
) -> None:
    """With no HUMANCONNECT_API_TOKEN the endpoint does not exist (404), whatever is sent."""
    settings = make_settings(DATABASE_URL=stored[0].database_url)
    with TestClient(create_app(settings)) as c:
        resp = c.get("/users/user@example.com", headers={"Authorization": "Bearer anything"})
    assert resp.status_code == 404


def test_embedding_function_reads_the_same(stored: tuple[Settings, str]) -> None:
    """Apps that embed the store get the same tokens from a plain function."""
    user = get_user_tokens("user@example.com", stored[0])
    assert user is not None and user.access_token == "access-secret-1"
    assert "access-secret-1" not in repr(user)
    assert get_user_tokens("nobody", stored[0]) is None


def test_readyz_follows_redis(
    make_settings: Callable[..., Settings], sqlite_url: str, own_redis: RedisServer
) -> None:
    """/readyz answers 503 (naming Redis) at once when Redis goes away, rather than hanging
    on it, and 200 again when it returns."""
    with TestClient(
        create_app(make_settings(DATABASE_URL=sqlite_url, REDIS_URL=own_redis.url))
    ) as c:
        assert c.get("/readyz").status_code == 200
        own_redis.kill()
        resp, took = timed(lambda: c.get("/readyz"))
        assert resp.status_code == 503 and resp.json()["checks"]["redis"] != "ok"
        assert took < HANG_GUARD * SOCKET_TIMEOUT_S, f"hung: {took:.1f} s"
        own_redis.start()
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready again")


@pytest.mark.postgres
def test_readyz_follows_the_database(
    make_settings: Callable[..., Settings], db_url: str, redis_client: redis.Redis
) -> None:
    """/readyz answers 503 (naming the database) when PostgreSQL becomes unreachable, rather
    than hanging on it, and 200 again when it is back."""
    url = make_url(db_url)
    if url.get_backend_name() != "postgresql":
        pytest.skip("the cut is made on the PostgreSQL connection")
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).open()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        with TestClient(create_app(make_settings(DATABASE_URL=proxied))) as c:
            assert c.get("/readyz").status_code == 200
            proxy.cut()
            resp, took = timed(lambda: c.get("/readyz"))
            assert resp.status_code == 503 and resp.json()["checks"]["database"] != "ok"
            assert took < HANG_GUARD * 2, f"hung: {took:.1f} s"
            proxy.open()
            wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="ready again")
    finally:
        proxy.cut()


def test_metrics_expose_what_operators_alert_on(
    client: TestClient, redis_client: redis.Redis
) -> None:
    """/metrics is Prometheus text with finishes, queue depth and outbox backlog."""
    accepted = 'humanconnect_finishes_total{outcome="accepted",reason=""}'
    refused = 'humanconnect_finishes_total{outcome="refused",reason="400"}'
    before = _samples(client.get("/metrics").text)
    client.post("/connect/finish", json=factories.finish_body())
    client.post("/connect/finish", json={"humanId": "x"})
    after = _samples(client.get("/metrics").text)
    # The web's counters live in this test process: compare, don't assume a fresh start.
    assert after[accepted] - before.get(accepted, 0.0) == 1
    assert after[refused] - before.get(refused, 0.0) == 1
    assert after["humanconnect_queue_depth"] == 1
    assert after["humanconnect_outbox_backlog"] == 0
    assert "# TYPE humanconnect_upstream_seconds histogram" in client.get("/metrics").text


def test_metrics_show_accept_latency_the_breaker_and_the_upstream_limit(
    client: TestClient, redis_client: redis.Redis
) -> None:
    """An accepted finish is one accept-latency observation; the breaker's gauge follows its
    Redis key; the limit is HUMANAPI_MAX_RPS; the series alerts watch are there at 0."""
    from humanconnect.redis_keys import BREAKER_OPEN

    count = "humanconnect_accept_seconds_count"
    before = _samples(client.get("/metrics").text)
    assert before["humanconnect_breaker_open"] == 0
    assert before["humanconnect_upstream_limit_rps"] == 1000  # conftest's HUMANAPI_MAX_RPS
    # Never counted yet, shown all the same: an alert on increase() sees the first one.
    assert 'humanconnect_exchanges_total{outcome="answer_lost"}' in before
    assert 'humanconnect_webhook_attempts_total{outcome="failed"}' in before
    assert 'humanconnect_finishes_total{outcome="refused",reason="redis_oom"}' in before
    client.post("/connect/finish", json=factories.finish_body())
    client.post("/connect/finish", json={"humanId": "x"})
    redis_client.set(BREAKER_OPEN, "1", px=60_000)
    after = _samples(client.get("/metrics").text)
    assert after[count] - before.get(count, 0.0) == 1  # the refused one is not an accept
    assert after["humanconnect_breaker_open"] == 1


def _samples(text: str) -> dict[str, float]:
    """Prometheus text as {series: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def test_read_back_compares_every_token_in_constant_time(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each presented token, whatever its length or how much of the real one it shares,
    goes through hmac.compare_digest (no early return that a timer could see)."""
    import hmac

    import producer.users

    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(producer.users.hmac, "compare_digest", spy)
    tries = ["x", API_TOKEN[:-1], API_TOKEN + "x", API_TOKEN[:-1] + "#", "y" * 200]
    for token in tries:
        resp = client.get("/users/user@example.com", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401
    assert [a.decode() for a, _ in seen] == tries
    assert all(b == API_TOKEN.encode() for _, b in seen)
    resp = client.get("/users/user@example.com", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert resp.status_code == 200 and len(seen) == len(tries) + 1


def test_upstream_histogram_is_cumulative_at_scrape(redis_client) -> None:
    """Each observation lands in one bucket; the scrape adds them up as Prometheus expects."""
    from humanconnect import metrics

    metrics.observe_many(redis_client, "upstream_seconds", [0.01, 0.2, 0.3], endpoint="tokens")
    metrics.observe_many(redis_client, "upstream_seconds", [20.0], endpoint="tokens")
    (family,) = [
        f
        for f in metrics.RedisCollector(redis_client, {}).collect()
        if f.name == "humanconnect_upstream_seconds"
    ]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets == {
        "0.05": 1,
        "0.1": 1,
        "0.25": 2,
        "0.5": 3,
        "1.0": 3,
        "2.5": 3,
        "5.0": 3,
        "10.0": 3,
        "+Inf": 4,
    }
    (total,) = [s.value for s in family.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(20.51)
