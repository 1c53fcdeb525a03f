"""Keeping the web's Redis connections open, so a burst on an idle service is fast at once.

A burst that meets an empty pool opens its connections while the finishes queue behind them:
each new connection is a TCP handshake and redis-py's setup commands, and the finishes that
arrive meanwhile each open another. A warm-up burst at high concurrency beforehand took that
cost away and one at concurrency 1 did not: the pool's size, not Python's first calls, was
the cost (`python -m bench --only step`; the figures are on the docs' benchmark page).

So the web opens `CONNECTIONS` before it starts serving, loads the accept script, and every
`INTERVAL_S` touches them again (a PING each): a Redis whose `timeout` closes idle clients,
a restart, or a NAT that forgets a quiet flow then costs the keeper a reconnect, not the
next burst.

With the pool warm, the first finish after an idle start was still slower than the next: a
profile of it showed FastAPI reading each endpoint's source on its first call
(`inspect.getsourcelines`, for error messages) and OpenSSL's first cipher context. `prime`
does both before serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

import fastapi.routing
import redis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from starlette.routing import BaseRoute

from humanconnect.crypto import Cipher
from producer.periodic import Periodic

log = logging.getLogger(__name__)

#: Connections kept open: above what 800 finishes/s hold at once (about 5), with room for a
#: moment when the process is held up.
CONNECTIONS = 32
#: How often they are touched; below the 300 s idle timeout some hosted Redis plans set.
INTERVAL_S = 10.0
#: A round waits for this long without an accept: it takes every connection it keeps at once,
#: and a finish that arrived meanwhile would open a new one. 800 finishes/s leave no such gap,
#: a few a second leave many.
QUIET_S = 0.05
#: ... but not past this since the last round: steady traffic uses only the few connections
#: it needs at once (the pool hands out the one last returned), and the rest would outlive
#: a Redis `timeout` of 300 s unused. A forced round costs such traffic a blip this often.
FORCE_AFTER_S = 120.0


def prime(api: FastAPI, cipher: Cipher) -> None:
    """Do now what each route and the cipher would do on their first call."""
    # FastAPI's own per-endpoint cache, filled on a route's first request. It is private:
    # a FastAPI without it costs each route's first request again, said at every start
    # (and tests/test_warm.py fails on it), never skipped in silence.
    extract = getattr(fastapi.routing, "_extract_endpoint_context", None)
    if extract is None:
        log.warning(
            "FastAPI has no routing._extract_endpoint_context: each route's first request "
            "reads its source again (producer/warm.py)"
        )
    else:
        for route in _routes(api.routes):
            extract(route.dependant.call)
    cipher.open(cipher.seal("warm"))


def freeze_heap() -> None:
    """Put what the process built so far out of the garbage collector's way: it lives as
    long as the process, and a full collection under load then walks only what requests
    left behind, not the whole start-up heap."""
    gc.collect()
    gc.freeze()


def _routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """The endpoints under `routes`, into included routers (FastAPI keeps those whole, as
    its private `_IncludedRouter.original_router`; tests/test_warm.py checks every
    documented operation is found)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)


class WarmPool(Periodic):
    """Open `connections` of `r`'s pool now and keep them open; `prepare` (loading scripts)
    runs with each round."""

    def __init__(
        self,
        r: Redis,
        prepare: Callable[[], Awaitable[object]] | None = None,
        connections: int = CONNECTIONS,
        interval_s: float = INTERVAL_S,
        last_use: Callable[[], float] = lambda: 0.0,
        quiet_s: float = QUIET_S,
        force_after_s: float = FORCE_AFTER_S,
    ):
        # The first round is `start`'s own, before the web serves.
        super().__init__(interval_s, first_delay_s=interval_s)
        self.r = r
        self.prepare = prepare
        self.connections = connections
        #: When the web last used the pool (time.monotonic()): rounds wait for a quiet gap.
        self.last_use = last_use
        self.quiet_s = quiet_s
        self.force_after_s = force_after_s
        self.skipped = 0
        self.touched = time.monotonic()

    async def touch(self) -> int:
        """Check out `connections` at once (so each is a different one), PING each, give them
        back; return how many answered. Redis being away is not an error here."""
        self.touched = time.monotonic()
        pool = self.r.connection_pool
        taken = await asyncio.gather(
            *(pool.get_connection() for _ in range(self.connections)), return_exceptions=True
        )
        held = [c for c in taken if not isinstance(c, BaseException)]
        try:
            answers = await asyncio.gather(*(_ping(c) for c in held), return_exceptions=True)
        finally:
            for conn in held:
                await pool.release(conn)
        if self.prepare is not None and held:
            try:
                await self.prepare()
            except (redis.exceptions.RedisError, OSError):
                pass  # the next round tries again; an accept loads it itself meanwhile
        return sum(1 for a in answers if a is True)

    async def round(self) -> None:
        """Touch the connections at the first quiet moment within half an interval, and skip
        the round if the web is busy throughout (unless the last round is FORCE_AFTER_S
        old): a round takes every kept connection at once, and amid a burst the finishes
        piled up behind it."""
        give_up = time.monotonic() + self.interval_s / 2
        while time.monotonic() - self.touched < self.force_after_s and not await self._quiet():
            if time.monotonic() >= give_up:
                self.skipped += 1
                log.debug("redis connection keeper: web busy, round skipped")
                return
        await self.touch()

    async def _quiet(self) -> bool:
        """Whether no finish began while this loop ran for `quiet_s`. A sleep that overran
        proves nothing: the loop was held up, and the finishes that came meanwhile have not
        begun yet."""
        started = time.monotonic()
        await asyncio.sleep(self.quiet_s)
        overran = time.monotonic() - started > 2 * self.quiet_s
        return not overran and self.last_use() < started

    async def start(self) -> None:
        """Open the connections (before the web serves), then keep them open."""
        opened = await self.touch()
        if opened < self.connections:
            log.warning("redis: %d of %d connections opened at start", opened, self.connections)
        await super().start()


async def _ping(conn: AbstractConnection) -> bool:
    await conn.send_command("PING")
    return await conn.read_response() in ("PONG", b"PONG")
