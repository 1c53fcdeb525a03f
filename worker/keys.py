"""Key rotation: re-encrypt every stored token under the first key, in resumable batches."""

from __future__ import annotations

from sqlalchemy import select

from worker.models import User
from worker.runtime import Runtime

BATCH = 500


def rotate_all(rt: Runtime, batch: int = BATCH) -> int:
    """Re-encrypt all users' tokens; each batch commits, so an interrupted run just resumes."""
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
