"""Per-request status records in Redis: what `GET /connect/finish/{id}` reads.

The producer writes the first record and the dedupe claim (producer/claims.py); the worker
moves the state on from there.

Two keys per session (names in humanconnect/redis_keys.py):
- the session claim -> JSON `{requestId, humanId}`: the dedupe claim, written with the
  message in one atomic call.
- the request's status -> a hash with `state`, `humanId`, `clientUserId`, `error`,
  `publicToken` (Fernet ciphertext, never plaintext), `updatedAt`, and while it is
  unfinished the fields of its `ExchangeRequest` (humanconnect/request.py) for a re-send.

The database's `sessions` table stays the durable truth; these records are fast copies.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis
from redis.commands.core import Script

from humanconnect.clock import now
from humanconnect.redis_keys import PENDING, done_channel, request_status
from humanconnect.states import RequestState


def new_request_id() -> str:
    """128 bits of randomness, URL-safe: the status it leads to carries a publicToken."""
    return secrets.token_urlsafe(16)


def set_state(
    r: redis.Redis, request_id: str, state: RequestState, ttl_s: int, **fields: str
) -> None:
    """Write a request's state and any extra fields, refreshing its expiry."""
    # No MULTI: nothing else writes this request's record meanwhile, and a transaction
    # doubles the replies to parse.
    pipe = r.pipeline(transaction=False)
    queue_state(pipe, request_id, state, ttl_s, **fields)
    pipe.execute()


def queue_state(pipe: Any, request_id: str, state: RequestState, ttl_s: int, **fields: str) -> None:
    """`set_state`'s commands, added to a pipeline the caller executes."""
    state = RequestState(state)
    key = request_status(request_id)
    mapping: dict[Any, Any] = {"state": str(state), "updatedAt": now().isoformat(), **fields}
    pipe.hset(key, mapping=mapping)
    if not state.final:
        pipe.hdel(key, "error")
    pipe.expire(key, ttl_s)
    if state.final:
        pipe.hdel(key, "sealedSessionToken")
        pipe.zrem(PENDING, request_id)
        # Wakes a producer holding a `Prefer: wait` request for it.
        pipe.publish(done_channel(request_id), str(state))
    else:
        # Progress: the reconciler leaves a request alone while a worker is moving it on.
        pipe.zadd(PENDING, {request_id: time.time()})


# KEYS: the session lock, the request's record, the pending set. The state names are
# RequestState's values (a script can't import them).
# ARGV: lock token, lock term (ms), requestId, updatedAt, humanId, record TTL, pending score.
BEGIN_SCRIPT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'succeeded' and state ~= 'failed' then
  redis.call('HSET', KEYS[2], 'state', 'running', 'updatedAt', ARGV[4], 'humanId', ARGV[5])
  redis.call('HDEL', KEYS[2], 'error')
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[3])
end
return 1
"""


def lock_and_begin(
    r: redis.Redis,
    lock_key: str,
    token: str,
    lock_ms: int,
    request_id: str,
    human_id: str,
    ttl_s: int,
) -> bool:
    """Take a session lock and, if taken, mark the request `running` in the same round
    trip, unless its record already says it ended (a duplicate delivery must not make a
    finished request look unfinished)."""
    global _begin
    if _begin is None:
        # A Script runs on whichever client it is given (EVALSHA, loading it if needed).
        _begin = r.register_script(BEGIN_SCRIPT)
    return bool(
        _begin(
            keys=[lock_key, request_status(request_id), PENDING],
            args=[token, lock_ms, request_id, now().isoformat(), human_id, ttl_s, time.time()],
            client=r,
        )
    )


_begin: Script | None = None


def get_state(r: redis.Redis, request_id: str) -> dict[str, str] | None:
    """The stored status record, or None when unknown (or expired)."""
    raw = r.hgetall(request_status(request_id))
    if not raw:
        return None
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
