"""Key rotation: re-encrypt every sealed value in the database under the first key.

Users' tokens and the session tokens kept for retries are rewritten in keyset batches, each
its own transaction: an interrupted run leaves every row readable (under the old key or the
new) and running it again finishes the job. Then the Connect tokens kept in Redis (the
current flow's, for a user's next open), each swapped only if no mint replaced it
meanwhile. Queued messages and status records in Redis are not rewritten: keep the old key
listed until they have expired (the retry window for messages, HUMANCONNECT_STATUS_TTL_S for
status records).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from humanconnect.crypto import DecryptError
from humanconnect.errors import ConfigError
from humanconnect.redis_keys import PREFIX
from humanconnect.runtime import Runtime
from humanconnect.storage.models import SessionRecord, User

BATCH = 500


#: KEYS: a kept Connect token's hash. ARGV: its sealed token as read, the same re-sealed. A
#: mint that wrote a new token meanwhile keeps it; HSET leaves the hash's expiry as it was.
#: Returns 1 when it swapped.
_SWAP = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'token', ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Rotated:
    users: int
    sessions: int
    connect_tokens: int = 0


def rotate_all(rt: Runtime, batch: int = BATCH) -> Rotated:
    """Re-encrypt every user's tokens and every kept session token under the first key, then
    every kept Connect token (Redis must answer for that last part)."""
    if not rt.settings.redis_configured:  # before the database's part, not after it
        raise ConfigError("REDIS_URL or REDIS_SENTINELS is required (kept Connect tokens)")
    users, sessions = _rotate_users(rt, batch), _rotate_sessions(rt, batch)
    return Rotated(users, sessions, _rotate_connect_tokens(rt, batch))


def _rotate_users(rt: Runtime, batch: int) -> int:
    done, last_id = 0, 0
    while True:
        with rt.db() as db:
            rows = db.scalars(
                select(User).where(User.id > last_id).order_by(User.id).limit(batch)
            ).all()
            if not rows:
                return done
            for row in rows:
                row.access_token = rt.cipher.rotate(row.access_token)
                if row.public_token:
                    row.public_token = rt.cipher.rotate(row.public_token)
            db.commit()
            done += len(rows)
            last_id = rows[-1].id


def _rotate_sessions(rt: Runtime, batch: int) -> int:
    done, last = 0, ""
    while True:
        with rt.db() as db:
            rows = db.scalars(
                select(SessionRecord)
                .where(
                    SessionRecord.session_hash > last,
                    SessionRecord.sealed_session_token.is_not(None),
                )
                .order_by(SessionRecord.session_hash)
                .limit(batch)
            ).all()
            if not rows:
                return done
            for row in rows:
                if row.sealed_session_token:  # the query's condition: always true here
                    row.sealed_session_token = rt.cipher.rotate(row.sealed_session_token)
            db.commit()
            done += len(rows)
            last = rows[-1].session_hash


def _rotate_connect_tokens(rt: Runtime, batch: int) -> int:
    """The Connect tokens kept in Redis. One already under the first key is left (SCAN may
    name a key twice, and a run may be a second one), and so is one sealed under a key no
    longer listed: it reads as none already, and the next mint writes over it."""
    swap = rt.redis.register_script(_SWAP)
    done = 0
    for key in rt.redis.scan_iter(match=f"{PREFIX}connect-token:*", count=batch):
        sealed = rt.redis.hget(key, "token")
        if not isinstance(sealed, bytes) or rt.cipher.under_first_key(sealed.decode()):
            continue  # expired since the scan saw it, or nothing to do
        try:
            fresh = rt.cipher.rotate(sealed.decode())
        except DecryptError:
            continue
        done += int(swap(keys=[key], args=[sealed, fresh]))
    return done
