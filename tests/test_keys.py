"""Encryption at rest and key rotation."""

from __future__ import annotations

import subprocess

import pytest
from sqlalchemy import select

from humanconnect.crypto import Cipher, DecryptError
from humanconnect.jobs.rotation import rotate_all
from humanconnect.runtime import Runtime
from humanconnect.storage.models import SessionRecord, User
from humanconnect.storage.tokens import get_user, save_tokens
from tests import factories
from tests.support.env import BIN, CLIENT_ID, FERNET_KEY, FERNET_KEY_2, service_env


def _save(rt: Runtime, n: int) -> list[str]:
    ids = []
    with rt.db() as db:
        for i in range(n):
            human = factories.human_id()
            save_tokens(
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
        assert all(get_user(db, both.cipher, u) for u in users)
    # batch of 3 over 7 rows: the loop must page, not stop after one batch
    assert rotate_all(both, batch=3).users == 7
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


def _kept_sessions(rt: Runtime, n: int) -> list[str]:
    """Sessions in flight: their token kept sealed for retries (as a first delivery does)."""
    tokens = []
    with rt.db() as db:
        for _ in range(n):
            job = factories.job()
            factories.session_row(db, job, rt.cipher, key=job.session_token[:64])
            tokens.append(job.session_token)
        db.commit()
    return tokens


def test_rotate_is_resumable_and_covers_kept_session_tokens(
    make_settings, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation that dies part-way leaves every row readable; `humanconnect keys rotate`
    run again leaves every user token and kept session token under the new key only."""
    old = Runtime(make_settings(DATABASE_URL=db_url, HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY))
    users = _save(old, 9)
    tokens = _kept_sessions(old, 5)
    keys = f"{FERNET_KEY_2},{FERNET_KEY}"
    both = Runtime(make_settings(DATABASE_URL=db_url, HUMANCONNECT_ENCRYPTION_KEYS=keys))
    # When the first run dies in its third batch of users ...
    real_rotate, calls = both.cipher.rotate, []

    def dying(value: str) -> str:
        calls.append(value)
        if len(calls) > 10:  # two batches of 2 users (2 tokens each), then part of a third
            raise RuntimeError("killed")
        return real_rotate(value)

    monkeypatch.setattr(both.cipher, "rotate", dying)
    with pytest.raises(RuntimeError):
        rotate_all(both, batch=2)
    new_only = Cipher([FERNET_KEY_2])
    with both.db() as db:
        rows = db.scalars(select(User).order_by(User.id)).all()
        # ... the committed batches are under the new key, the rest under the old, and
        # every row still opens with both keys listed.
        assert [_opens(new_only, r.access_token) for r in rows] == [True] * 4 + [False] * 5
        assert all(get_user(db, both.cipher, u) for u in users)
    # Then the command, run again, finishes: users and kept session tokens.
    env = service_env(
        DATABASE_URL=db_url,
        HUMANCONNECT_ENCRYPTION_KEYS=keys,
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANCONNECT_AUTO_MIGRATE="0",
    )
    done = subprocess.run(
        [str(BIN / "humanconnect"), "keys", "rotate"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "re-encrypted 9 users and 5 kept session tokens" in done.stdout
    with both.db() as db:
        for row in db.scalars(select(User)):
            assert new_only.open(row.access_token).startswith("access-")
            assert new_only.open(row.public_token or "").startswith("public-")
        sealed = db.scalars(select(SessionRecord.sealed_session_token)).all()
    assert sorted(new_only.open(s or "") for s in sealed) == sorted(tokens)


def _opens(cipher: Cipher, value: str) -> bool:
    try:
        cipher.open(value)
    except DecryptError:
        return False
    return True
