"""Encryption at rest and key rotation."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests import factories
from tests.support import FERNET_KEY, FERNET_KEY_2
from worker import store
from worker.crypto import Cipher, DecryptError
from worker.keys import rotate_all
from worker.models import User
from worker.runtime import Runtime


def _save(rt: Runtime, n: int) -> list[str]:
    ids = []
    with rt.db() as db:
        for i in range(n):
            human = factories.human_id()
            store.save_tokens(
                db,
                rt.cipher,
                human_id=human,
                client_user_id=f"u{i}-{human}",
                access_token=f"access-{human}",
                public_token=f"public-{human}",
                received_us=factories.now_us(),
                session_hash=human,
            )
            ids.append(f"u{i}-{human}")
        db.commit()
    return ids


def test_rotation_keeps_old_rows_readable_and_rewrites_them(make_settings, db_url: str) -> None:
    """Rows under the old key stay readable with a new key first; rotate moves them all."""
    old = Runtime(make_settings(DATABASE_URL=db_url, HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY))
    users = _save(old, 7)
    both = Runtime(
        make_settings(
            DATABASE_URL=db_url, HUMANCONNECT_ENCRYPTION_KEYS=f"{FERNET_KEY_2},{FERNET_KEY}"
        )
    )
    with both.db() as db:
        assert all(store.get_user(db, both.cipher, u) for u in users)
    # batch of 3 over 7 rows: the loop must page, not stop after one batch
    assert rotate_all(both, batch=3) == 7
    new_only = Cipher([FERNET_KEY_2])
    with both.db() as db:
        for row in db.scalars(select(User)):
            assert new_only.open(row.access_token).startswith("access-")
            assert row.public_token and new_only.open(row.public_token).startswith("public-")
    with pytest.raises(DecryptError):
        with both.db() as db:
            Cipher([FERNET_KEY]).open(db.scalars(select(User.access_token)).first() or "")


def test_raw_columns_never_hold_plaintext(make_settings, db_url: str) -> None:
    """What the database stores is ciphertext, not the token."""
    rt = Runtime(make_settings(DATABASE_URL=db_url))
    _save(rt, 1)
    with rt.db() as db:
        row = db.scalars(select(User)).one()
    assert "access-" not in row.access_token and "public-" not in (row.public_token or "")
