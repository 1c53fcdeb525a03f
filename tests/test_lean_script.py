"""The accept script's lean call answers as redis-py's own script call does, loads the script
again when Redis has lost it, and gets past a connection Redis dropped. A real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from humanconnect import redis_clients
from humanconnect.settings import Settings
from producer.lean_script import LeanScript, _send_and_read
from tests.support.env import wait_until
from tests.support.servers import SPIN, BusyProbe

# Every kind of reply the accept script gives: nil, a string, an integer, a table.
SCRIPT = """
if ARGV[1] == 'nil' then return false end
if ARGV[1] == 'str' then return redis.call('GET', KEYS[1]) end
if ARGV[1] == 'int' then return tonumber(ARGV[2]) end
if ARGV[1] == 'table' then return {'limited', 1, tonumber(ARGV[2])} end
return redis.error_reply('NOPE ' .. ARGV[1])
"""


def _client(redis_url: str) -> AsyncRedis:
    return redis_clients.async_client(Settings.model_validate({"REDIS_URL": redis_url}))


def test_replies_are_those_of_redis_pys_script_call(redis_url: str) -> None:
    """Nil, string, integer, table and an error reply come back as register_script's do."""

    async def run() -> None:
        r = _client(redis_url)
        await r.set("k", "v")
        lean, theirs = LeanScript(r, SCRIPT), r.register_script(SCRIPT)
        try:
            cases: list[list[str | int]] = [["nil"], ["str"], ["int", 42], ["table", 1234567]]
            for args in cases:
                expected: Any = await theirs(keys=["k"], args=args)
                assert await lean(["k"], args) == expected
            with pytest.raises(redis.exceptions.ResponseError, match="NOPE other"):
                await lean(["k"], ["other"])
        finally:
            await r.aclose()

    asyncio.run(run())


def test_a_script_redis_lost_is_loaded_again(redis_url: str, redis_client: redis.Redis) -> None:
    """After SCRIPT FLUSH (a restart, a promoted replica), the next call loads it and answers."""

    async def run() -> None:
        r = _client(redis_url)
        lean = LeanScript(r, SCRIPT)
        try:
            await lean.load()
            assert redis_client.script_exists(lean.sha) == [True]
            redis_client.script_flush()
            assert await lean(["k"], ["int", 7]) == 7
            assert redis_client.script_exists(lean.sha) == [True]
        finally:
            await r.aclose()

    asyncio.run(run())


def test_a_connection_redis_dropped_is_replaced_within_the_call(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Redis closed the pooled connection (its `timeout`, a restart): the call retries once on
    a fresh one, as the client's own commands do, and answers."""

    async def run() -> None:
        r = _client(redis_url)
        lean = LeanScript(r, SCRIPT)
        try:
            assert await lean(["k"], ["int", 1]) == 1
            # Given the pool's one connection killed by the server
            killed = redis_client.client_kill_filter(_type="normal", skipme=True)
            assert killed >= 1
            # Then the next call still answers, on a new connection
            assert await lean(["k"], ["int", 2]) == 2
        finally:
            await r.aclose()

    asyncio.run(run())


def _clients_of_others(redis_client: redis.Redis) -> int:
    """Connections to Redis other than this test's own client's."""
    return len(redis_client.client_list(_type="normal")) - 1


def test_calls_of_one_turn_share_one_connection_and_each_gets_its_own_reply(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Fifty calls made together, one of them an error and the script lost meanwhile: they go
    out on one connection (where one each would open fifty), and each caller gets its own
    reply, the error only to its own caller."""

    async def run() -> None:
        before = _clients_of_others(redis_client)
        r = _client(redis_url)
        lean = LeanScript(r, SCRIPT)
        try:
            await lean.load()  # on the pool's first connection
            redis_client.script_flush()
            calls = [lean(["k"], ["int", i]) for i in range(49)]
            calls.insert(20, lean(["k"], ["other"]))
            replies = await asyncio.gather(*calls, return_exceptions=True)
            error = replies.pop(20)
            assert isinstance(error, redis.exceptions.ResponseError)
            assert "NOPE other" in str(error)
            assert replies == list(range(49))
            assert _clients_of_others(redis_client) - before <= 1
        finally:
            await r.aclose()

    asyncio.run(run())


def _patient_client(redis_url: str) -> AsyncRedis:
    """A client that waits out the spin (the service's gives up after 1 s and sends again on
    a new connection, which would hide what these tests look at)."""
    return AsyncRedis.from_url(redis_url, socket_timeout=30, decode_responses=True)


@asynccontextmanager
async def _lean_beside_busy(redis_url: str) -> AsyncIterator[tuple[LeanScript, AsyncRedis]]:
    """The script on a patient client, and a client to keep Redis busy with: both connected
    (the script loaded), so that neither makes a connection while Redis is busy."""
    r, busy = _patient_client(redis_url), _patient_client(redis_url)
    lean = LeanScript(r, SCRIPT)
    try:
        await lean.load()
        await busy.ping()
        yield lean, busy
    finally:
        await r.aclose()
        await busy.aclose()


def _connections_made(redis_client: redis.Redis) -> int:
    return int(redis_client.info("stats")["total_connections_received"])


def test_a_caller_that_gives_up_leaves_the_others_calls_alone(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Of three calls sent together while Redis is busy, one caller gives up (the accept's
    deadline): the other two get their replies when Redis answers, on the connection they
    were sent on."""

    async def run() -> None:
        async with _lean_beside_busy(redis_url) as (lean, busy):
            probe = BusyProbe(redis_url)
            made = _connections_made(redis_client)
            spinning, calls = await _calls_while_busy(lean, busy, probe)
            calls[1].cancel()
            assert await calls[0] == 0 and await calls[2] == 2
            with pytest.raises(asyncio.CancelledError):
                await calls[1]
            await spinning
            # None dropped, none sent again: no connection made since.
            assert _connections_made(redis_client) == made

    asyncio.run(run())


def test_when_every_caller_gives_up_the_call_is_dropped(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Three calls given up on while Redis is busy: their send is cancelled and its
    connection dropped, as a lone call's was (nobody would read its replies), and the next
    call gets its own reply on a new one."""

    async def run() -> None:
        async with _lean_beside_busy(redis_url) as (lean, busy):
            spinning, calls = await _calls_while_busy(lean, busy, BusyProbe(redis_url))
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await spinning
            made = _connections_made(redis_client)
            assert await lean(["k"], ["int", 9]) == 9
            assert _connections_made(redis_client) == made + 1

    asyncio.run(run())


class _BreaksAfter:
    """A connection that answers `answers` commands, then breaks (a stand-in for Redis
    dropping it mid-batch); what each write carried is kept. Each command's reply is the
    number it carries."""

    def __init__(self, answers: int):
        self.answers = answers
        self.writes: list[list[bytes]] = []
        self._unanswered: list[bytes] = []

    async def send_packed_command(self, packed: list[bytes]) -> None:
        self.writes.append(list(packed))
        self._unanswered.extend(packed)

    async def read_response(self) -> int:
        if self.answers == 0:
            raise redis.ConnectionError("dropped")
        self.answers -= 1
        return int(self._unanswered.pop(0).split(b"\r\n")[-2])


def test_a_batch_cut_mid_way_sends_again_only_what_was_not_answered() -> None:
    """Five commands, the connection dropped after two replies: the retry (the client's
    policy, on a new connection) carries the last three alone, and the replies line up."""
    packed = [f"*2\r\n$4\r\nECHO\r\n$1\r\n{i}\r\n".encode() for i in range(5)]
    replies: list[object] = []
    first, second = _BreaksAfter(2), _BreaksAfter(99)

    async def run() -> None:
        with pytest.raises(redis.ConnectionError):
            await _send_and_read(first, packed, replies)  # type: ignore[arg-type]
        await _send_and_read(second, packed, replies)  # type: ignore[arg-type]

    asyncio.run(run())
    assert replies == [0, 1, 2, 3, 4]
    assert first.writes == [packed] and second.writes == [packed[2:]]


async def _calls_while_busy(
    lean: LeanScript, busy: AsyncRedis, probe: BusyProbe
) -> tuple[asyncio.Task[Any], list[asyncio.Task[Any]]]:
    """Redis kept busy 1.5 s by `busy`, and three calls sent into it, given 0.2 s to leave:
    the spin and the calls."""
    spinning = asyncio.ensure_future(busy.eval(SPIN, 0, 1_500_000))
    try:
        await wait_until(probe.busy, 10, what="Redis busy")
    finally:
        probe.close()
    calls = [asyncio.ensure_future(lean(["k"], ["int", i])) for i in range(3)]
    await asyncio.sleep(0.2)
    return spinning, calls
