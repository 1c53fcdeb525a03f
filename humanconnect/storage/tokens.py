"""Token storage: encrypted at rest, one row per humanId, the newest session winning."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from humanconnect.clock import now
from humanconnect.crypto import Cipher
from humanconnect.errors import PermanentUpstreamError
from humanconnect.storage.models import User, users_table


@dataclass(frozen=True)
class StoredUser:
    """A user's tokens in clear, for the read-back endpoint and embedding apps."""

    client_user_id: str
    human_id: str
    access_token: str
    public_token: str | None
    updated_at: datetime
    #: When the access token expires (µs since the epoch); None: no known expiry.
    access_expires_us: int | None = None

    def __repr__(self) -> str:
        return f"StoredUser(client_user_id={self.client_user_id!r}, human_id={self.human_id!r})"


_INSERTS: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


_UPSERT_COLUMNS: tuple[str, ...] = (
    "client_user_id",
    "access_token",
    "public_token",
    "received_us",
    "session_hash",
    "updated_at",
    "repair_attempts",
    "repair_after_us",
    "repair_error",
    # Tokens of the original flow state no expiry: a newer session's clears an older one.
    "access_expires_us",
)


#: What a current-flow access token changes in an existing row: the publicToken and the
#: session ordering stay as they are.
_ACCESS_COLUMNS: tuple[str, ...] = (
    "client_user_id",
    "access_token",
    "access_expires_us",
    "updated_at",
)


@lru_cache(maxsize=4)
def _upsert(dialect: str, access_only: bool) -> Any:
    """The token upsert, built once per dialect and kind: building it per call cost more CPU
    than running it (the values come as parameters)."""
    # On the table, not the mapped class: the Core path skips the ORM's bulk machinery.
    users = users_table
    stmt = _INSERTS[dialect](users)
    if access_only:
        # The access token that lives longest wins; a row of the original flow (no expiry)
        # takes the current flow's.
        newer = users.c.access_expires_us.is_(None) | (
            users.c.access_expires_us < stmt.excluded.access_expires_us
        )
        columns = _ACCESS_COLUMNS
    else:
        newer = (users.c.received_us < stmt.excluded.received_us) | (
            (users.c.received_us == stmt.excluded.received_us)
            & (users.c.session_hash < stmt.excluded.session_hash)
        )
        columns = _UPSERT_COLUMNS
    return stmt.on_conflict_do_update(
        index_elements=[users.c.human_id],
        set_={k: stmt.excluded[k] for k in columns},
        where=newer,
    ).returning(users.c.session_hash)


def save_tokens(
    db: Session,
    cipher: Cipher,
    *,
    human_id: str,
    client_user_id: str,
    access_token: str,
    public_token: str | None,
    received_us: int,
    session_hash: str,
    access_expires_us: int | None = None,
) -> bool:
    """Upsert a user's tokens unless a later-received session already stored its own; with
    `access_expires_us` (a current-flow access token), only the access token and its expiry,
    unless a token that lives longer is stored.

    Returns True when these tokens are now the stored ones. One statement, so concurrent
    workers can't interleave a read and a write: the database compares. A clientUserId held
    by another humanId raises PermanentUpstreamError and leaves the transaction to be rolled
    back.
    """
    values = {
        "human_id": human_id,
        "client_user_id": client_user_id,
        "access_token": cipher.seal(access_token),
        "public_token": cipher.seal(public_token) if public_token else None,
        "received_us": received_us,
        "session_hash": session_hash,
        "updated_at": now(),
        # New tokens start the repair bookkeeping afresh.
        "repair_attempts": 0,
        "repair_after_us": None,
        "repair_error": None,
        "access_expires_us": access_expires_us,
    }
    stmt = _upsert(db.get_bind().dialect.name, access_expires_us is not None)
    try:
        # RETURNING answers "are these the stored tokens now?" in the same statement: no row
        # comes back when the WHERE kept a newer session's tokens.
        stored = db.connection().execute(stmt, values).first()
    except IntegrityError:
        # The transaction is spoilt: the caller's session context rolls it back.
        raise PermanentUpstreamError("clientUserId already belongs to another humanId") from None
    return stored is not None


def user_row(db: Session, client_user_id: str) -> User | None:
    """A user's row by clientUserId (tokens still sealed), or None."""
    return db.scalar(select(User).where(User.client_user_id == client_user_id))


def get_user(db: Session, cipher: Cipher, client_user_id: str) -> StoredUser | None:
    """A user's decrypted tokens by clientUserId, or None."""
    row = user_row(db, client_user_id)
    if row is None:
        return None
    return StoredUser(
        client_user_id=row.client_user_id,
        human_id=row.human_id,
        access_token=cipher.open(row.access_token),
        public_token=cipher.open(row.public_token) if row.public_token else None,
        updated_at=row.updated_at,
        access_expires_us=row.access_expires_us,
    )


def sealed_public_token(db: Session, human_id: str) -> str | None:
    """A user's current publicToken by humanId, still sealed, or None."""
    return db.scalar(select(User.public_token).where(User.human_id == human_id))
