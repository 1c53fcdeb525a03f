"""Key rotation: re-encrypt every sealed value in the database under the first key.

Users' tokens and the session tokens kept for retries are rewritten in keyset batches, each
its own transaction: an interrupted run leaves every row readable (under the old key or the
new) and running it again finishes the job. Values outside the database (queued messages,
status records in Redis) are not rewritten: keep the old key listed until they have expired
(the retry window for messages, HUMANCONNECT_STATUS_TTL_S for status records).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from humanconnect.runtime import Runtime
from humanconnect.storage.models import SessionRecord, User

BATCH = 500


@dataclass(frozen=True)
class Rotated:
    users: int
    sessions: int


def rotate_all(rt: Runtime, batch: int = BATCH) -> Rotated:
    """Re-encrypt every user's tokens and every kept session token under the first key."""
    return Rotated(users=_rotate_users(rt, batch), sessions=_rotate_sessions(rt, batch))


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
