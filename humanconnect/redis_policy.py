"""Redis must never evict what is queued: a check every process makes at start.

A Redis under memory pressure with an LRU or LFU `maxmemory-policy` (the default of several
managed Redis services) drops keys silently, and the queue, the pending set and the status
records are keys like any other. `noeviction` makes it refuse writes instead, which the web
turns into `503`s with nothing half-accepted. The policy is read from `INFO memory`, which
managed services that disable `CONFIG` still answer.
"""

from __future__ import annotations

import logging

import redis

from humanconnect.errors import ConfigError

log = logging.getLogger(__name__)

SAFE = "noeviction"
OVERRIDE = "HUMANCONNECT_ALLOW_EVICTING_REDIS"


def policy(client: redis.Redis) -> str | None:
    """Redis's `maxmemory-policy`, or None when Redis can't be reached now."""
    try:
        return str(client.info("memory").get("maxmemory_policy", SAFE))
    except redis.exceptions.RedisError:
        return None


def check(client: redis.Redis, *, allow: bool) -> None:
    """Raise ConfigError (one line, naming the setting) unless Redis evicts nothing or the
    operator allowed it, in which case warn. A Redis that can't be reached is left to the
    process's own handling of an absent Redis; the next start checks again."""
    found = policy(client)
    if found is None:
        log.warning("could not read Redis's maxmemory-policy now; it is checked at every start")
        return
    if found == SAFE:
        return
    if allow:
        log.warning(
            "Redis maxmemory-policy is %s: under memory pressure it can evict queued sessions "
            "(running anyway: %s=1)",
            found,
            OVERRIDE,
        )
        return
    raise ConfigError(
        f"Redis maxmemory-policy is {found}, which can evict queued sessions: set it to "
        f"{SAFE} (or {OVERRIDE}=1 to run anyway)"
    )
