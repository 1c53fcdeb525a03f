"""Warming a worker before its first task, so the first seconds of a burst don't pay for it.

A worker that starts idle opened its Redis connections, its database connections, its Lua
scripts and OpenSSL's first cipher context inside its first tasks: 32 threads at once, the
moment a burst arrived, on the CPUs the web needs to accept it.
`prepare` does it once the worker is ready, before there is anything to drain.

Only at start: the worker keeps no connections open afterwards as the web's keeper does
(producer/warm.py), so after an idle spell longer than a Redis `timeout` its first tasks
reconnect again.
"""

from __future__ import annotations

import logging

import redis
from redis.lock import Lock
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from humanconnect.runtime import Runtime
from humanconnect.status_records import BEGIN_SCRIPT
from humanconnect.storage.db import engine_for
from humanconnect.upstream.breaker import FAILURE_SCRIPT
from humanconnect.upstream.limiter import RESERVE_SCRIPT

log = logging.getLogger(__name__)

#: The scripts an exchange runs (its session lock's too), loaded so that none meets NOSCRIPT
#: (and loads) in a task.
SCRIPTS = (
    BEGIN_SCRIPT,
    FAILURE_SCRIPT,
    RESERVE_SCRIPT,
    Lock.LUA_REACQUIRE_SCRIPT,
    Lock.LUA_RELEASE_SCRIPT,
)


def prepare(rt: Runtime, connections: int) -> None:
    """Open `connections` Redis connections and the database pool's, load the scripts and
    use the cipher once. Nothing here fails the worker: Redis or the database being away,
    or a database it cannot open, leave the tasks to open what they need when they run."""
    try:
        _redis(rt.redis, connections)
    except redis.exceptions.RedisError as exc:
        log.warning("worker warm-up: redis not ready (%s)", type(exc).__name__)
    try:
        _database(rt.settings.database_url)
    except (SQLAlchemyError, OSError, ImportError) as exc:
        log.warning("worker warm-up: database not ready (%s)", type(exc).__name__)
    rt.cipher.open(rt.cipher.seal("warm"))


def _redis(r: redis.Redis, connections: int) -> None:
    for script in SCRIPTS:
        r.script_load(script)
    pool = r.connection_pool
    # Held together, so that each is a different connection; never past the pool's cap.
    held = []
    try:
        for _ in range(min(connections, pool.max_connections)):
            conn = pool.get_connection()
            held.append(conn)
            conn.send_command("PING")
            conn.read_response()
    finally:
        for conn in held:
            pool.release(conn)


def _database(url: str) -> None:
    engine = engine_for(url)
    # A QueuePool keeps `size()` open; another pool (SQLite in memory) one at most.
    size = engine.pool.size() if isinstance(engine.pool, QueuePool) else 1
    held = []
    try:
        for _ in range(size):
            conn = engine.connect()
            held.append(conn)
            conn.execute(text("SELECT 1"))
    finally:
        for conn in held:
            conn.close()
