"""Tables. The schema itself is created only by the Alembic migrations (./migrations)."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so migrations can refer to them on every database.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    """One row of tokens per humanId; tokens are Fernet ciphertext, never plaintext."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    human_id: Mapped[str] = mapped_column(String(128), unique=True)
    client_user_id: Mapped[str] = mapped_column(String(255), unique=True)
    access_token: Mapped[str] = mapped_column(Text)
    public_token: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: When the producer received the session whose tokens these are (microseconds since the
    #: epoch: an integer compares the same way on every database). Newest session wins.
    received_us: Mapped[int] = mapped_column(BigInteger)
    #: Tie-break between two sessions received in the same microsecond.
    session_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: publicToken repair: transient failures so far, and not before when to try again.
    repair_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    repair_after_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: Set when the upstream refused for good (404, 401): not retried until an operator asks.
    repair_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: When the access token expires (µs since the epoch): the provider's current flow's
    #: tokens live 24 hours; null for the original flow's, which state no expiry.
    access_expires_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (
        Index(
            "ix_users_missing_public_token",
            "id",
            postgresql_where=text("public_token IS NULL"),
            sqlite_where=text("public_token IS NULL"),
        ),
    )


class SessionRecord(Base):
    """The durable idempotency record of one session, keyed by a hash of its token."""

    __tablename__ = "sessions"

    session_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    human_id: Mapped[str] = mapped_column(String(128))
    received_us: Mapped[int] = mapped_column(BigInteger)
    #: queued, running, retrying, succeeded or failed.
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: How many times a worker started on it.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: An earlier call may have reached the upstream without its answer reaching us (a read
    #: timeout, a dropped connection): a later refusal then means the answer was lost.
    ambiguous: Mapped[bool] = mapped_column(Boolean, default=False)
    client_user_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Why it failed: a humanconnect.states.ErrorKind.
    error_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    #: The clientUserId the finish's connect ticket vouched for (kept for `failed --retry`).
    expected_client_user_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: An access finish's connected sources, as queued (kept for `failed --retry`: its
    #: connect.completed names them).
    connected_sources: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: The session token, Fernet-sealed, kept until the session succeeds so that
    #: `humanconnect failed --retry` can queue it again. Cleared on success.
    sealed_session_token: Mapped[str | None] = mapped_column(Text, nullable=True)


class OutboxEvent(Base):
    """An event committed with the change it reports, relayed to the Redis Stream later."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_unsent",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    #: The stream entry's fields, as a JSON object of strings.
    fields: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: Null until Redis took the entry; the relay picks up what is null.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WebhookDelivery(Base):
    """One event's delivery to one endpoint, written in the event's own transaction."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("outbox_id", "endpoint", name="uq_webhook_deliveries_outbox_id"),
        # The dispatcher's query: one endpoint's pending deliveries by when they are due.
        Index(
            "ix_webhook_deliveries_due",
            "endpoint",
            "due_us",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    outbox_id: Mapped[int] = mapped_column(Integer, ForeignKey("outbox.id"))
    #: The URL as configured (it may carry a credential: shown only through `safe_url`).
    endpoint: Mapped[str] = mapped_column(Text)
    #: pending, delivered or failed.
    state: Mapped[str] = mapped_column(String(16))
    #: Attempts started so far (one is counted when it is claimed, before it is sent).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Not before this (µs since the epoch): the next try, or the end of a claim's lease.
    due_us: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The last attempt's HTTP status (none for a timeout or refused connection).
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Why the last attempt did not count ("HTTP 500", "timeout", ...), or null.
    last_error: Mapped[str | None] = mapped_column(String(200), nullable=True)
    #: The start of the receiver's last answer, at most 200 characters.
    last_response: Mapped[str | None] = mapped_column(String(200), nullable=True)


# The tables themselves, for Core statements on the hot path: they skip the ORM's unit of
# work and bulk machinery, which cost more CPU than the statements.
users_table = cast(Table, User.__table__)
sessions_table = cast(Table, SessionRecord.__table__)
outbox_table = cast(Table, OutboxEvent.__table__)
deliveries_table = cast(Table, WebhookDelivery.__table__)


class Erasure(Base):
    """A user erased (humanconnect/erasure.py), by a digest of one of their ids (never the
    id itself), and when, by Redis's clock: a session received before it ends `erased`."""

    __tablename__ = "erasures"

    mark: Mapped[str] = mapped_column(String(32), primary_key=True)
    erased_us: Mapped[int] = mapped_column(BigInteger)
