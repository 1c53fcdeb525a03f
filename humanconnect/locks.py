"""The per-session Redis lock one delivery holds while it works on a session.

It is redis-py's `Lock`, used in two ways redis-py does not document: taken inside our own
script (the round trip that also marks the request running), and released inside a pipeline
(the success's round trip). Both lean on `Lock.local.token` and `Lock.LUA_RELEASE_SCRIPT`;
tests/test_session_lock.py is the canary that fails when a redis-py upgrade changes them.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.lock import Lock

from humanconnect import status_records

log = logging.getLogger(__name__)


@contextlib.contextmanager
def held_or_skip(r: redis.Redis, name: str, timeout: float) -> Iterator[Lock | None]:
    """The lock `name` taken without waiting, or None when another holds it (the caller
    skips its run); released on the way out. A release that fails (the lock expired, or went
    with a Redis restart) is only logged: the lock ends by itself."""
    lock = Lock(r, name, timeout=timeout)
    if not lock.acquire(blocking=False):
        yield None
        return
    try:
        yield lock
    finally:
        try:
            lock.release()
        except redis.exceptions.RedisError as exc:
            log.warning("lock %s lost before release: %s", name, type(exc).__name__)


class SessionLock(Lock):
    """Taken in the same round trip that marks the request running, released in the
    success's round trip, renewed only once a third of its term has passed (a fresh lock
    needs no round trip before the first call or the store)."""

    def __init__(self, r: redis.Redis, name: str, timeout: float):
        # One lock object per run, used by one thread: no thread-local token needed.
        super().__init__(r, name, timeout=timeout, thread_local=False)
        self.term = timeout
        self.renewed = time.monotonic()

    @property
    def held(self) -> bool:
        return self.local.token is not None

    def take(self, request_id: str, human_id: str, status_ttl_s: int) -> bool:
        """Acquire without waiting, marking the request running if it has not ended."""
        token = secrets.token_hex(16)
        got = status_records.lock_and_begin(
            self.redis, self.name, token, int(self.term * 1000), request_id, human_id, status_ttl_s
        )
        return self.took(token, got)

    def queue_take(self, pipe: Any, request_id: str, human_id: str, status_ttl_s: int) -> str:
        """`take` in a pipeline the caller executes (a batch's locks in one round trip);
        the caller hands the returned token and the reply to `took`."""
        token = secrets.token_hex(16)
        call = status_records.begin_call(
            self.name, token, int(self.term * 1000), request_id, human_id, status_ttl_s
        )
        status_records.queue_lock_and_begin(pipe, call)
        return token

    def took(self, token: str, got: object) -> bool:
        """Hold the lock if the take's reply says it was taken."""
        if got:
            self.local.token = token.encode()
            self.renewed = time.monotonic()
        return bool(got)

    def queue_release(self, pipe: Any) -> bytes:
        """Release in a pipeline the caller executes; returns the token, which the caller
        gives back to `restore` if the pipeline fails. EVAL, not EVALSHA: a script object in
        a pipeline costs a SCRIPT EXISTS round trip of its own."""
        token: bytes = self.local.token
        self.local.token = None
        pipe.eval(self.LUA_RELEASE_SCRIPT, 1, self.name, token)
        return token

    def restore(self, token: bytes) -> None:
        """Hold `token` again after a failed `queue_release` (the run's own release retries)."""
        self.local.token = token

    def renew(self) -> None:
        """A full term from now, if a third of the current one has passed."""
        if time.monotonic() - self.renewed > self.term / 3:
            self.reacquire()
            self.renewed = time.monotonic()

    def renew_if_reachable(self) -> None:
        """Renew if Redis answers; the caller goes ahead either way (the store step: the
        tokens in hand are the user's only copy, and a duplicate delivery can't overwrite a
        success)."""
        try:
            self.renew()
        except redis.exceptions.RedisError as exc:
            log.warning("could not renew the session lock before storing: %s", type(exc).__name__)

    def release_quietly(self, request_id: str) -> None:
        """Release if still held; an expired lock may be another delivery's by now."""
        if not self.held:
            return
        try:
            self.release()
        except redis.exceptions.LockError:
            log.warning("session lock expired before release request=%s", request_id)
