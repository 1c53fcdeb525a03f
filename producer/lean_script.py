"""A Lua script called on the finish path with EVALSHA, without redis-py's per-command layers.

The accept script is the one Redis call a finish makes, with about forty arguments. Through
`register_script`, redis-py encodes each argument in Python, then wraps the call in its
command machinery (observability hooks, event dispatch, response callbacks) before the
connection's own send and read; for the web that was a sizeable share of a finish's CPU
(`python -m bench --only cpu`; the figures are on the docs' benchmark page). Here the command
is packed in one call into hiredis and sent on a connection of the client's own pool, under
the same retry policy the client gives its commands (`redis_clients.async_client`: one retry
on a fresh connection after a connection error or a timeout). The pool is the client's, so
a Sentinel pool still finds the primary and drops a connection a replica answered.

Calls made in one turn of the event loop go out together: a burst's finishes reach their
accept call side by side, and each paid a write, a connection from the pool and a wakeup for
its reply of its own. Gathered, they share one write on one connection, and their replies
are read in order. Each caller still gets its own reply or error; a caller that gives up
(the accept's deadline) leaves the others' calls alone, and when every caller of a batch
has given up the batch is cancelled, as a lone call was (redis-py then drops the
connection, whose replies nobody would read).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


@dataclass
class _Batch:
    """Calls gathered in one turn of the loop, and the send that carries them."""

    loop: asyncio.AbstractEventLoop
    packed: list[bytes] = field(default_factory=list)
    replies: list[asyncio.Future[Any]] = field(default_factory=list)
    sending: asyncio.Task[None] | None = None

    def add(self, packed: bytes) -> asyncio.Future[Any]:
        reply: asyncio.Future[Any] = self.loop.create_future()
        self.packed.append(packed)
        self.replies.append(reply)
        return reply

    def abandon(self) -> None:
        """A caller gave up: once all have, nobody waits for the send."""
        if self.sending is not None and all(r.done() for r in self.replies):
            self.sending.cancel()

    def settle(self, replies: list[Any]) -> None:
        """Each caller its reply; an error (Redis's, or the connection's) raised to it."""
        for reply, value in zip(self.replies, replies, strict=True):
            if reply.done():
                continue
            if isinstance(value, Exception):
                reply.set_exception(value)
            else:
                reply.set_result(value)

    def fail(self, error: Exception) -> None:
        for reply in self.replies:
            if not reply.done():
                reply.set_exception(error)


class LeanScript:
    """`await script(keys, args)`: `source` run on `r`'s pool by its SHA1, loaded again when
    Redis has lost it (a restart, a promoted replica). Arguments are `str`, `bytes` or `int`."""

    def __init__(self, r: Redis, source: str):
        self.r = r
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        #: The batch this turn of the loop is gathering, sent at the turn's end.
        self._gathering: _Batch | None = None

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        packed = hiredis.pack_command(("EVALSHA", self.sha, len(keys), *keys, *args))
        loop = asyncio.get_running_loop()
        batch = self._gathering
        # A batch of another loop (a test client's, since closed) is not this turn's.
        if batch is None or batch.loop is not loop:
            batch = self._gathering = _Batch(loop)
            loop.call_soon(self._send, batch)
        reply = batch.add(packed)
        try:
            return await reply
        except asyncio.CancelledError:
            batch.abandon()
            raise

    async def load(self) -> None:
        """SCRIPT LOAD it (the warm-up does, before the web serves)."""
        await self.r.script_load(self.source)

    def _send(self, batch: _Batch) -> None:
        if self._gathering is batch:
            self._gathering = None
        batch.sending = batch.loop.create_task(self._run(batch))

    async def _run(self, batch: _Batch) -> None:
        try:
            replies = await self._call(batch.packed)
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if lost:
                try:
                    await self.load()
                except Exception as error:  # only the calls that needed it fail
                    again: list[Any] = [error] * len(lost)
                else:
                    again = await self._call([batch.packed[i] for i in lost])
                for i, reply in zip(lost, again, strict=True):
                    replies[i] = reply
        except asyncio.CancelledError:
            # Cancelled by its callers, who have all gone; or by the loop's end, whose
            # callers still waiting hear that Redis did not answer, not that they were
            # cancelled themselves.
            batch.fail(RedisConnectionError("the call to Redis was cancelled"))
            raise
        batch.settle(replies)

    async def _call(self, packed: list[bytes]) -> list[Any]:
        """A reply for each of `packed`, in order: its own, or the error that kept it from
        coming. A connection that breaks after some replies were read is replaced once (the
        client's retry policy), and only the commands not yet answered are sent again."""
        replies: list[Any] = []
        try:
            pool = self.r.connection_pool
            conn = await pool.get_connection()
            try:
                await conn.retry.call_with_retry(
                    lambda: _send_and_read(conn, packed, replies),
                    lambda error, failures: conn.disconnect(error=error, failure_count=failures),
                    with_failure_count=True,
                )
            finally:
                await pool.release(conn)
        except Exception as error:  # those not answered get it as their own
            replies.extend([error] * (len(packed) - len(replies)))
        return replies


async def _send_and_read(conn: AbstractConnection, packed: list[bytes], replies: list[Any]) -> None:
    """The commands of `packed` not yet in `replies`, in one write; their replies appended
    in order, a command's error as its reply."""
    await conn.send_packed_command(packed[len(replies) :])
    while len(replies) < len(packed):
        try:
            replies.append(await conn.read_response())
        except ResponseError as error:
            replies.append(error)
