"""Per-source finish limits: per client address and per ticket user, counted inside the accept
call; over a limit, 429 with Retry-After and nothing written; a duplicate is never refused.
The address is the socket's peer, or X-Forwarded-For's nearest untrusted address behind a
trusted proxy: tested on a real web process, started as the Procfile starts it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from starlette.requests import Request

from humanconnect import redis_keys
from humanconnect.errors import ConfigError
from humanconnect.rate import Rate
from humanconnect.redis_keys import PENDING, QUEUE
from humanconnect.settings import load
from humanconnect.tickets import mint
from producer.finish import client_address
from tests import factories
from tests.support.env import CLIENT_ID, FERNET_KEY, ROOT, TICKET_KEY, service_env
from tests.support.processes import start_web


def _post(
    client: TestClient | httpx.Client,
    body: dict[str, str],
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return client.post("/connect/finish", json=body, headers=headers)


def _written(r: redis.Redis) -> tuple[int, int, int]:
    """Queued messages, claims and status records: all three move together or not at all."""
    return (
        r.llen(QUEUE),
        len(list(r.scan_iter("hc:session:*"))),
        len(list(r.scan_iter("hc:request:*"))),
    )


def test_rates_parse_and_refuse_nonsense() -> None:
    assert Rate.parse("60/minute") == Rate(60, 60)
    assert Rate.parse(" 10 / Seconds ") == Rate(10, 1)
    assert Rate.parse("off") is None and Rate.parse("") is None
    rate = Rate.parse("3/second")
    assert rate and (rate.interval_us, rate.tolerance_us) == (333_333, 666_667)
    bad_rates = ("60", "0/minute", "-1/minute", "60/fortnight", "1.5/second", "2000000/second")
    for bad in (*bad_rates, "sixty/minute"):
        with pytest.raises(ValueError):
            Rate.parse(bad)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HUMANCONNECT_FINISH_LIMIT_PER_IP", "60 a minute"),
        ("HUMANCONNECT_FINISH_LIMIT_PER_USER", "0/minute"),
        ("HUMANCONNECT_TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal"),
    ],
)
def test_a_malformed_limit_or_proxy_list_stops_the_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load()


def test_over_the_address_limit_429_nothing_written_duplicates_still_answered(
    make_client: Callable[..., TestClient], redis_client: redis.Redis
) -> None:
    client = make_client(HUMANCONNECT_FINISH_LIMIT_PER_IP="5/minute")
    # The web's counters are the process's: another test in it may have counted refusals.
    refusals_before = _limit_ip_refusals(client)
    bodies = [factories.finish_body() for _ in range(8)]
    answers = [_post(client, b) for b in bodies]
    assert [a.status_code for a in answers] == [202] * 5 + [429] * 3
    refused = answers[5]
    assert refused.json() == {
        "error": "too many finishes from this address, try again later",
        "fields": {},
    }
    # The sixth may come when one of the five's minute has passed: 12 s at 5/minute.
    assert 1 <= int(refused.headers["Retry-After"]) <= 12
    assert _written(redis_client) == (5, 5, 5)
    assert redis_client.zcard(PENDING) == 5
    # A duplicate of an accepted session, over the limit: answered as always, and free.
    again = _post(client, bodies[0])
    assert again.status_code == 202
    assert again.json()["requestId"] == answers[0].json()["requestId"]
    assert _written(redis_client) == (5, 5, 5)
    assert _limit_ip_refusals(client) == refusals_before + 3


def _limit_ip_refusals(client: TestClient) -> float:
    wanted = 'humanconnect_finishes_total{outcome="refused",reason="limit_ip"} '
    lines = client.get("/metrics").text.splitlines()
    return next((float(line[len(wanted) :]) for line in lines if line.startswith(wanted)), 0.0)


def test_a_client_that_waits_retry_after_is_taken(
    make_client: Callable[..., TestClient], redis_client: redis.Redis
) -> None:
    # A minute's limit: no slot comes free while the test posts, however slow the machine.
    client = make_client(HUMANCONNECT_FINISH_LIMIT_PER_IP="2/minute")
    assert [_post(client, factories.finish_body()).status_code for _ in range(2)] == [202, 202]
    refused = _post(client, factories.finish_body())
    assert refused.status_code == 429
    # Refusals take nothing: five more, and waiting the time the first named is still enough
    # (had each refusal used up allowance, the next slot would be 150 s further off).
    assert {_post(client, factories.finish_body()).status_code for _ in range(5)} == {429}
    wait_s = int(refused.headers["Retry-After"])
    assert 1 <= wait_s <= 30
    # The wait, on the limit's own clock rather than slept: the address's due time (µs, by
    # Redis's clock) moved back by Retry-After.
    key = redis_keys.finish_limit("ip", "testclient")
    due_us = int(redis_client.get(key) or 0)
    redis_client.set(key, due_us - wait_s * 1_000_000, keepttl=True)
    assert _post(client, factories.finish_body()).status_code == 202
    assert redis_client.llen(QUEUE) == 3


def test_the_user_limit_counts_each_tickets_user_apart(
    make_client: Callable[..., TestClient], redis_client: redis.Redis
) -> None:
    client = make_client(
        HUMANCONNECT_TICKET_KEY=TICKET_KEY,
        HUMANCONNECT_FINISH_LIMIT_PER_USER="3/minute",
    )

    def as_user(user: str) -> int:
        headers = {"Authorization": f"Bearer {mint(TICKET_KEY, user)}"}
        return _post(client, factories.finish_body(), headers=headers).status_code

    assert [as_user("alice@example.com") for _ in range(4)] == [202, 202, 202, 429]
    assert [as_user("bob@example.com") for _ in range(3)] == [202] * 3
    refused = _post(
        client,
        factories.finish_body(),
        headers={"Authorization": f"Bearer {mint(TICKET_KEY, 'alice@example.com')}"},
    )
    assert refused.json()["error"] == "too many finishes from this user, try again later"
    assert _written(redis_client)[0] == 6
    # The user's key names a digest, never the user id (often an email address).
    keys = [k.decode() for k in redis_client.scan_iter("hc:limit:user:*")]
    assert len(keys) == 2 and not any("example.com" in k for k in keys)


def test_a_ticketed_finish_counts_against_its_user_not_its_address(
    make_client: Callable[..., TestClient], redis_client: redis.Redis
) -> None:
    """Many users behind one address (a NAT), each with a ticket: the address limit does not
    hold them; each user's own limit still does."""
    client = make_client(
        HUMANCONNECT_TICKET_KEY=TICKET_KEY,
        HUMANCONNECT_FINISH_LIMIT_PER_IP="3/minute",
        HUMANCONNECT_FINISH_LIMIT_PER_USER="2/minute",
    )

    def as_user(user: str) -> int:
        headers = {"Authorization": f"Bearer {mint(TICKET_KEY, user)}"}
        return _post(client, factories.finish_body(), headers=headers).status_code

    # Ten users from one address, three times its limit: all taken
    assert [as_user(f"user{i}@example.com") for i in range(10)] == [202] * 10
    # One of them over their own limit: refused, as a user
    assert [as_user("user0@example.com") for _ in range(2)] == [202, 429]
    assert _written(redis_client)[0] == 11
    assert not list(redis_client.scan_iter("hc:limit:ip:*"))  # the address was never counted


@pytest.mark.parametrize(
    ("peer", "counted"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("testclient", "testclient"),
    ],
)
def test_an_ipv6_client_counts_by_its_64(peer: str, counted: str) -> None:
    """One host holds a whole /64: counted by address, it would have 2^64 allowances."""
    request = Request({"type": "http", "client": (peer, 5000), "headers": []})
    assert client_address(request) == counted


def test_limits_off_take_every_finish(
    make_client: Callable[..., TestClient], redis_client: redis.Redis
) -> None:
    client = make_client(
        HUMANCONNECT_FINISH_LIMIT_PER_IP="off", HUMANCONNECT_FINISH_LIMIT_PER_USER="off"
    )
    assert {_post(client, factories.finish_body()).status_code for _ in range(30)} == {202}
    assert not list(redis_client.scan_iter("hc:limit:*"))


def _from(address: str, url: str) -> httpx.Client:
    """A client of `url` whose connections leave from `address` (any 127.0.0.0/8 is local)."""
    return httpx.Client(
        base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=10
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_address_is_the_peer_unless_a_trusted_proxy_names_another(
    redis_url: str, redis_client: redis.Redis, db_url: str, tmp_path: Path
) -> None:
    base = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": db_url,
        "HUMANAPI_CLIENT_ID": CLIENT_ID,
        "HUMANCONNECT_ENCRYPTION_KEYS": FERNET_KEY,
        "HUMANCONNECT_FINISH_LIMIT_PER_IP": "2/minute",
    }
    # No trusted proxy: X-Forwarded-For is ignored, whoever sends it (127.0.0.1 included,
    # which uvicorn would trust by default).
    web, url = start_web(service_env(**base), ROOT, tmp_path / "web.log")
    try:
        for peer in ("127.0.0.1", "127.0.0.2"):
            with _from(peer, url) as c:
                codes = [
                    _post(
                        c, factories.finish_body(), headers={"X-Forwarded-For": f"203.0.113.{i}"}
                    ).status_code
                    for i in range(3)
                ]
            assert codes == [202, 202, 429], (peer, codes)
        assert redis_client.exists(redis_keys.finish_limit("ip", "127.0.0.2"))
        assert not list(redis_client.scan_iter("hc:limit:ip:203.*"))
    finally:
        web.stop()
    redis_client.flushdb()
    # Behind trusted proxies (the loopback net): the nearest address that is not one counts.
    web, url = start_web(
        service_env(**base, HUMANCONNECT_TRUSTED_PROXIES="127.0.0.0/8, ::1"),
        ROOT,
        tmp_path / "web2.log",
    )
    try:
        with _from("127.0.0.3", url) as c:
            spoofed = "198.51.100.7, 203.0.113.9, 127.0.0.9"

            def send(xff: str) -> int:
                return _post(
                    c, factories.finish_body(), headers={"X-Forwarded-For": xff}
                ).status_code

            assert [send(spoofed) for _ in range(3)] == [202, 202, 429]
            # Each client behind the proxy has its own count.
            assert send("203.0.113.10") == 202
        assert redis_client.exists(redis_keys.finish_limit("ip", "203.0.113.9"))
        assert not redis_client.exists(redis_keys.finish_limit("ip", "198.51.100.7"))
        assert not redis_client.exists(redis_keys.finish_limit("ip", "127.0.0.3"))
    finally:
        web.stop()
