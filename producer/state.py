"""What the routes share: built once per app, the async parts inside the server's loop."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from redis.asyncio import Redis as AsyncRedis

from humanconnect import redis_clients
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings
from producer.accept import Acceptor
from producer.claims import Claims
from producer.lanes import WaitingLane
from producer.memory import MemoryWatch
from producer.message import MessageBuilder
from producer.mints import Mints
from producer.tickets import TicketCheck
from producer.waiters import Waiters
from producer.warm import WarmPool


@dataclass
class Parts:
    settings: Settings
    rt: Runtime
    aredis: AsyncRedis
    claims: Claims
    acceptor: Acceptor
    waiters: Waiters
    tickets: TicketCheck
    memory: MemoryWatch
    warm: WarmPool
    mints: Mints

    @classmethod
    async def start(cls, settings: Settings, rt: Runtime, celery: Celery) -> Parts:
        aredis = redis_clients.async_client(settings)
        memory = MemoryWatch(aredis)
        await memory.start()
        claims = Claims(
            aredis,
            settings.status_ttl_s,
            WaitingLane.for_rate(settings.max_rps),
            max_backlog=settings.max_backlog,
            per_ip=settings.finish_limit_per_ip,
            per_user=settings.finish_limit_per_user,
            memory=memory,
            replica_wait=settings.replica_wait,
        )
        waiters = Waiters(aredis)
        await waiters.start()
        # Last, so its connections are open when the server starts taking finishes.
        warm = WarmPool(aredis, prepare=claims.preload, last_use=lambda: claims.last_accept)
        await warm.start()
        messages = MessageBuilder(celery)
        return cls(
            settings,
            rt,
            aredis,
            claims,
            Acceptor(claims, messages, rt.cipher),
            waiters,
            TicketCheck(settings),
            memory,
            warm,
            Mints(aredis, messages, waiters, settings.finish_limit_per_user),
        )

    async def stop(self) -> None:
        await self.warm.stop()
        await self.waiters.stop()
        await self.memory.stop()
        await self.aredis.aclose()
