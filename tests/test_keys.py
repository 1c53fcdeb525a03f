"""Encryption at rest and key rotation."""

from __future__ import annotations

import subprocess

import pytest
import redis
from cryptography.fernet import Fernet
from sqlalchemy import select

from humanconnect.crypto import Cipher, DecryptError
from humanconnect.jobs.rotation import rotate_all
from humanconnect.minting import read_connect_token
from humanconnect.redis_keys import connect_token
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
    make_settings, db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
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
        REDIS_URL=redis_url,
        HUMANCONNECT_ENCRYPTION_KEYS=keys,
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANCONNECT_AUTO_MIGRATE="0",
    )
    done = subprocess.run(
        [str(BIN / "humanconnect"), "keys", "rotate"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "re-encrypted 9 users, 5 kept session tokens and 0 kept Connect tokens" in done.stdout
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


def _keep_connect_token(r: redis.Redis, cipher: Cipher, user: str, token: str) -> None:
    """As a mint keeps one (humanconnect/minting.py): a hash that expires with the token."""
    key = connect_token(user)
    r.hset(key, mapping={"token": cipher.seal(token), "type": "session", "expiresAt": "0"})
    r.expire(key, 3600)


def test_rotate_reseals_kept_connect_tokens_and_keeps_one_minted_meanwhile(
    make_settings, db_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Connect tokens kept in Redis move to the new key with their expiry; one a mint
    replaced while the rotation read it keeps the new mint; one sealed under a key no longer
    listed (it reads as none) is left as it is."""
    old = Cipher([FERNET_KEY])
    for user in ("ann", "bob", "cy"):
        _keep_connect_token(redis_client, old, user, f"token-of-{user}")
    _keep_connect_token(redis_client, Cipher([Fernet.generate_key().decode()]), "dee", "lost")
    stray = redis_client.hget(connect_token("dee"), "token")
    keys = f"{FERNET_KEY_2},{FERNET_KEY}"
    rt = Runtime(make_settings(DATABASE_URL=db_url, HUMANCONNECT_ENCRYPTION_KEYS=keys))
    real_hget = rt.redis.hget

    def minted_meanwhile(key: str, field: str) -> object:
        sealed = real_hget(key, field)
        if key == connect_token("cy").encode():  # a mint writes over it between read and swap
            redis_client.hset(key, "token", rt.cipher.seal("cy-minted-again"))
        return sealed

    monkeypatch.setattr(rt.redis, "hget", minted_meanwhile)
    assert rotate_all(rt).connect_tokens == 2
    new_only = Cipher([FERNET_KEY_2])
    for user in ("ann", "bob"):
        kept = read_connect_token(redis_client, new_only, user)
        assert kept is not None and kept.token == f"token-of-{user}"
        assert 3500 < redis_client.ttl(connect_token(user)) <= 3600
    again = read_connect_token(redis_client, rt.cipher, "cy")
    assert again is not None and again.token == "cy-minted-again"
    assert redis_client.hget(connect_token("dee"), "token") == stray
    # Run again: everything readable is under the first key already.
    monkeypatch.undo()
    assert rotate_all(rt).connect_tokens == 0


def test_rotate_says_when_redis_did_not_answer_after_the_database_part(
    db_url: str, make_settings
) -> None:
    """The database's part commits first; Redis away, the command says what is done and
    exits 1."""
    rt = Runtime(make_settings(DATABASE_URL=db_url))
    _save(rt, 2)
    env = service_env(
        DATABASE_URL=db_url,
        REDIS_URL="redis://127.0.0.1:1/0",  # nothing listens there
        HUMANCONNECT_ENCRYPTION_KEYS=f"{FERNET_KEY_2},{FERNET_KEY}",
        HUMANAPI_CLIENT_ID=CLIENT_ID,
        HUMANCONNECT_AUTO_MIGRATE="0",
    )
    done = subprocess.run(
        [str(BIN / "humanconnect"), "keys", "rotate"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the database's tokens are re-encrypted" in done.stderr
    assert "Traceback" not in done.stderr
    with rt.db() as db:
        assert all(
            _opens(Cipher([FERNET_KEY_2]), row.access_token) for row in db.scalars(select(User))
        )
