"""The session lock leans on redis-py's Lock internals (`local.token`, LUA_RELEASE_SCRIPT,
`reacquire`): this is the canary that fails when a redis-py upgrade changes them."""

from __future__ import annotations

import time

import redis
from redis.lock import Lock

from humanconnect import redis_keys, status_records
from humanconnect.locks import SessionLock
from humanconnect.states import RequestState

NAME = redis_keys.session_lock("canary")


def test_redis_py_still_has_what_the_lock_uses() -> None:
    """The attributes and script the session lock relies on exist on redis-py's Lock."""
    assert isinstance(Lock.LUA_RELEASE_SCRIPT, str) and "del" in Lock.LUA_RELEASE_SCRIPT.lower()
    assert callable(Lock.reacquire)
    lock = Lock(redis.Redis(), "x", timeout=1, thread_local=False)
    assert hasattr(lock.local, "token") and lock.local.token is None


def test_take_marks_running_and_release_in_a_pipeline_frees_it(redis_client: redis.Redis) -> None:
    """Taken in the begin script, the lock is held (token set); released inside a pipeline,
    the key is gone and the lock knows it no longer holds it."""
    status_records.set_state(redis_client, "rid", RequestState.QUEUED, 60, humanId="h")
    lock = SessionLock(redis_client, NAME, timeout=30)
    assert lock.take("rid", "h", 60) and lock.held
    assert redis_client.get(NAME) == lock.local.token
    assert status_records.get_state(redis_client, "rid")["state"] == RequestState.RUNNING  # type: ignore[index]
    # Another delivery cannot take it meanwhile
    assert not SessionLock(redis_client, NAME, timeout=30).take("rid", "h", 60)
    pipe = redis_client.pipeline(transaction=False)
    lock.queue_release(pipe)
    assert pipe.execute() == [1]
    assert not lock.held and redis_client.exists(NAME) == 0


def test_a_failed_release_can_be_restored_and_retried(redis_client: redis.Redis) -> None:
    """A pipeline that never ran leaves the lock in Redis; `restore` lets the run release it."""
    lock = SessionLock(redis_client, NAME, timeout=30)
    assert lock.take("rid", "h", 60)
    token = lock.queue_release(redis_client.pipeline(transaction=False))  # never executed
    lock.restore(token)
    lock.release()
    assert redis_client.exists(NAME) == 0


def test_release_of_a_lock_someone_else_holds_is_refused(redis_client: redis.Redis) -> None:
    """After expiry another delivery's lock is not ours to release: the script answers 0."""
    lock = SessionLock(redis_client, NAME, timeout=30)
    assert lock.take("rid", "h", 60)
    redis_client.set(NAME, b"someone-else")
    pipe = redis_client.pipeline(transaction=False)
    lock.queue_release(pipe)
    assert pipe.execute() == [0]
    assert redis_client.get(NAME) == b"someone-else"


def test_renew_waits_a_third_of_the_term_then_extends_it(redis_client: redis.Redis) -> None:
    """A fresh lock is not renewed (no round trip); past a third of its term it gets a full
    term again."""
    lock = SessionLock(redis_client, NAME, timeout=0.6)
    assert lock.take("rid", "h", 60)
    redis_client.pexpire(NAME, 300)
    lock.renew()  # fresh: nothing sent
    assert redis_client.pttl(NAME) <= 300
    lock.renewed = time.monotonic() - 0.3
    lock.renew()
    assert redis_client.pttl(NAME) > 450
