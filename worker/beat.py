"""Beat's scheduler: RedBeat's, so that any number of beats can run and exactly one sends.

RedBeat keeps the schedule (each entry's definition and last run) in Redis and lets only the
beat holding its lock send. The sender renews the lock on every pass; a standby waits at start
for the lock, trying every `beat_max_loop_interval`, and once it holds it carries on from the
last runs recorded in Redis, so no job runs twice for one interval. At start every beat writes
the schedule from its configuration into Redis once it holds the lock, and deletes the
entries written earlier that the configuration no longer has (a webhook endpoint removed from
the settings stops ticking). The lock is checked again before each send.

What this class adds is surviving Redis being away, which the stock scheduler did (it only
logged the failed sends). RedBeat lets a connection error out of its pass, which ends the
process (redbeat issues 285 and 314). Here the pass is tried again a second later. A lock
lost meanwhile (it expired during the outage, or Redis came back without it) makes this beat
a standby again through RedBeat's own acquisition; whichever beat takes the lock writes the
configured schedule again first, in case Redis lost it with the lock.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import redis
from redbeat.schedulers import RedBeatScheduler, acquire_distributed_beat_lock
from redis.exceptions import LockNotOwnedError

log = logging.getLogger(__name__)

#: How long a pass that could not reach Redis waits before the next.
RETRY_S = 1.0
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError)
#: Replies of a Redis that is there but takes no writes for now: a primary short of the
#: replicas its `min-replicas-to-write` asks for (the Sentinel deployment sets 1), a
#: demoted primary, a replica cut off from its primary. Waited out like an outage.
UNWRITABLE = ("NOREPLICAS", "READONLY", "MASTERDOWN")


def redis_away(exc: redis.RedisError) -> bool:
    """Whether `exc` says Redis can't be written now, rather than that the call was wrong."""
    return isinstance(exc, REDIS_AWAY) or str(exc).startswith(UNWRITABLE)


class Scheduler(RedBeatScheduler):
    """RedBeat's scheduler, kept running through a Redis outage and a lost lock."""

    #: RedBeat's redis-py lock while this beat holds it, else None.
    lock: Any
    #: The lock the schedule was last written under (None: not since this beat took it).
    _written_under: object = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            if self.lock is None:
                # RedBeat's own wait for the lock, as at start (blocks while another holds it).
                acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=self))
            if self._written_under is not self.lock:
                super().setup_schedule()
                self._written_under = self.lock
            return float(super().tick(*args, **kwargs))
        except LockNotOwnedError:
            log.warning("beat: lost the lock (another beat may send now); waiting to take it")
            self.lock = None
            return 0.0
        except redis.RedisError as exc:
            if not redis_away(exc):
                raise
            log.warning("beat: Redis unreachable (%s); trying again in %.0f s", exc, RETRY_S)
            return RETRY_S

    def setup_schedule(self) -> None:
        # Celery calls this at start, before the lock is taken: a standby must not rewrite
        # (or prune) the schedule the sender runs, say during a rolling upgrade whose hosts
        # configure different webhook URLs. `tick` writes it once this beat holds the lock.
        pass

    def maybe_due(self, entry: Any, **kwargs: Any) -> Any:
        # The lock checked again right before each send, not only at the start of the pass:
        # a pass that stalled past the lock's timeout (a frozen host) must not send what the
        # beat that took over has sent meanwhile. LockNotOwnedError ends the pass in `tick`.
        if self.lock is not None and entry.is_due()[0]:
            self.lock.extend(int(self.lock_timeout))
        return super().maybe_due(entry, **kwargs)

    def close(self) -> None:
        try:
            super().close()
        except redis.RedisError as exc:
            if not redis_away(exc):
                raise
            # The lock then expires by itself, within redbeat_lock_timeout.
            log.warning("beat: could not release the lock, Redis unreachable (%s)", exc)
            self.lock = None
