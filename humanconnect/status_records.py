"""Per-request status records in Redis: what `GET /connect/finish/{id}` reads.

The producer writes the first record and the dedupe claim (producer/claims.py); the worker
moves the state on from there.

Two keys per session (names in humanconnect/redis_keys.py):
- the session claim -> `requestId humanIdDigest [s|f]`: the dedupe claim, written with the
  message in one atomic call; the last letter, added when the request ends, says how. It
  lives HUMANCONNECT_STATUS_TTL_S, far longer than a finished request's status record, so
  it is kept as small as a string key gets (an embedded string, no JSON): a digest of the
  humanId is enough to refuse a session sent again with another one.
- the request's status -> a hash with `state`, `humanId`, `clientUserId`, `error`,
  `publicToken` (Fernet ciphertext, never plaintext), `updatedAt`, and while it is
  unfinished the fields of its `ExchangeRequest` (humanconnect/request.py) for a re-send.
  Once the request has ended it lives only HUMANCONNECT_FINISHED_STATUS_TTL_S; readers then
  fall back to the database's `sessions` row.

The database's `sessions` table stays the durable truth; these records are fast copies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.commands.core import Script

from humanconnect.clock import now
from humanconnect.redis_keys import PENDING, done_channel, request_status
from humanconnect.states import RequestState

if TYPE_CHECKING:
    from humanconnect.settings import Settings


def new_request_id() -> str:
    """128 bits of randomness, URL-safe: the status it leads to carries a publicToken."""
    return secrets.token_urlsafe(16)


def ttl_for(settings: Settings, state: RequestState | str) -> int:
    """How long a record in `state` lives: a finished request's only as long as it is likely
    to be polled, an unfinished one's as long as the claim (a re-send reads its fields)."""
    if RequestState(state).final:
        return settings.finished_status_ttl_s
    return settings.status_ttl_s


def set_state(
    r: redis.Redis, request_id: str, state: RequestState, ttl_s: int, **fields: str
) -> None:
    """Write a request's state and any extra fields, refreshing its expiry."""
    # No MULTI: nothing else writes this request's record meanwhile, and a transaction
    # doubles the replies to parse.
    pipe = r.pipeline(transaction=False)
    queue_state(pipe, request_id, state, ttl_s, **fields)
    pipe.execute()


def queue_outcome(
    pipe: Any,
    settings: Settings,
    claim_key: str,
    request_id: str,
    state: RequestState,
    *,
    release: bool = False,
    **fields: str,
) -> None:
    """A worker's news of a request, in a pipeline the caller executes: its state and fields,
    kept as long as a record in that state lives, and once it has ended, the session's claim
    marked with how (with `release`, kept only a minute more: an access finish's claim, see
    humanconnect/exchange.py)."""
    state = RequestState(state)
    if state.final and release:
        queue_release_claim(pipe, claim_key, request_id, state)
    elif state.final:
        queue_mark_claim(pipe, claim_key, request_id, state)
    queue_state(pipe, request_id, state, ttl_for(settings, state), **fields)


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


def begin_call(
    lock_key: str, token: str, lock_ms: int, request_id: str, human_id: str, ttl_s: int
) -> tuple[list[str], list[Any]]:
    """BEGIN_SCRIPT's keys and arguments: take a session lock and, if taken, mark the request
    `running` in the same round trip, unless its record already says it ended (a duplicate
    delivery must not make a finished request look unfinished)."""
    keys = [lock_key, request_status(request_id), PENDING]
    return keys, [token, lock_ms, request_id, now().isoformat(), human_id, ttl_s, time.time()]


def lock_and_begin(
    r: redis.Redis,
    lock_key: str,
    token: str,
    lock_ms: int,
    request_id: str,
    human_id: str,
    ttl_s: int,
) -> bool:
    """`begin_call` run now; whether the lock was taken."""
    global _begin
    if _begin is None:
        # A Script runs on whichever client it is given (EVALSHA, loading it if needed).
        _begin = r.register_script(BEGIN_SCRIPT)
    keys, args = begin_call(lock_key, token, lock_ms, request_id, human_id, ttl_s)
    return bool(_begin(keys=keys, args=args, client=r))


_begin: Script | None = None


def queue_lock_and_begin(pipe: Any, call: tuple[list[str], list[Any]]) -> None:
    """A `begin_call` in a pipeline the caller executes (its reply: 1 when taken). EVAL, not
    EVALSHA: a script object in a pipeline costs a SCRIPT EXISTS round trip of its own."""
    keys, args = call
    pipe.eval(BEGIN_SCRIPT, len(keys), *keys, *args)


def get_state(r: redis.Redis, request_id: str) -> dict[str, str] | None:
    """The stored status record, or None when unknown (or expired)."""
    raw = r.hgetall(request_status(request_id))
    if not raw:
        return None
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


@dataclass(frozen=True)
class ClaimRecord:
    """A session's dedupe claim, read back."""

    request_id: str
    #: `human_digest` of the humanId the session was first accepted with.
    human_digest: str
    #: The request's final state once it ended (and its worker said so), else None.
    final: RequestState | None = None

    def names(self, human_id: str) -> bool:
        """True when `human_id` is the one the session was accepted with."""
        return self.human_digest == human_digest(human_id)


#: A claim's last letter once its request ended.
_FINAL_MARKS = {RequestState.SUCCEEDED: "s", RequestState.FAILED: "f"}


def human_digest(human_id: str) -> str:
    """48 bits of a humanId: only ever compared with the digest of another humanId sent with
    the same session token, so a collision would need both the token and a crafted id."""
    digest = hashlib.blake2b(human_id.encode(), digest_size=6).digest()
    return base64.urlsafe_b64encode(digest).decode()


def claim_value(request_id: str, human_id: str) -> str:
    """The claim the accept writes."""
    return f"{request_id} {human_digest(human_id)}"


def read_claim(raw: str | bytes) -> ClaimRecord:
    """A claim as stored: this compact form, or the JSON `{requestId, humanId}` written
    before it (still read until those claims expire)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text.startswith("{"):
        data = json.loads(text)
        return ClaimRecord(data["requestId"], human_digest(data["humanId"]))
    request_id, digest, *mark = text.split(" ")
    final = next((state for state, m in _FINAL_MARKS.items() if mark == [m]), None)
    return ClaimRecord(request_id, digest, final)


# KEYS: the session claim. ARGV: the requestId, the mark. Only this request's own claim is
# marked: a claim made since by another request for the token is not this one's to touch.
MARK_CLAIM_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then return 0 end
local request_id, digest = string.match(v, '^(%S+) (%S+)')
redis.call('SET', KEYS[1], request_id .. ' ' .. digest .. ' ' .. ARGV[2], 'KEEPTTL')
return 1
"""


def queue_mark_claim(pipe: Any, claim_key: str, request_id: str, state: RequestState) -> None:
    """Mark a session's claim with how its request ended, in a pipeline the caller executes:
    a duplicate finish is then answered truthfully after the status record (and even the
    `sessions` row) is gone. EVAL, not EVALSHA: a script object in a pipeline costs a SCRIPT
    EXISTS round trip of its own."""
    pipe.eval(MARK_CLAIM_SCRIPT, 1, claim_key, request_id, _FINAL_MARKS[RequestState(state)])


# KEYS: the claim. ARGV: the requestId, the mark, the seconds it is kept. Only this
# request's own claim is marked and shortened.
RELEASE_CLAIM_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then return 0 end
if ARGV[2] == 'f' then return redis.call('DEL', KEYS[1]) end
local request_id, digest = string.match(v, '^(%S+) (%S+)')
redis.call('SET', KEYS[1], request_id .. ' ' .. digest .. ' ' .. ARGV[2], 'EX', ARGV[3])
return 1
"""
#: How long an access finish's claim outlives its request when it succeeded: a client that
#: got a `503` while its finish was taken all the same sends the same payload again within
#: seconds, and is answered with that finish rather than fetching the token a second time
#: (another payload is a new finish: producer/accept.py). A failed one's goes at once, so
#: trying again is a new finish.
RELEASED_CLAIM_TTL_S = 60


def queue_release_claim(
    pipe: Any, claim_key: str, request_id: str, state: RequestState = RequestState.FAILED
) -> None:
    """Mark a claim with how its request succeeded and let it lapse soon, or delete it if the
    request failed, if it is still `request_id`'s, in a pipeline the caller executes (an
    access finish's claim: the user's next finish after that fetches again)."""
    mark = _FINAL_MARKS[RequestState(state)]
    pipe.eval(RELEASE_CLAIM_SCRIPT, 1, claim_key, request_id, mark, RELEASED_CLAIM_TTL_S)
