"""Factories for test data: session token objects shaped like the ones seen in the wild."""

from __future__ import annotations

import secrets

from sqlalchemy.orm import Session

from humanconnect.clock import now_us
from humanconnect.crypto import Cipher, session_hash
from humanconnect.request import Job
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Faults, StandIn, client_user_id_for
from humanconnect.storage import sessions, tokens
from humanconnect.storage.models import SessionRecord
from humanconnect.tickets import mint

# Re-exported: the tests not about the limit take their slot from here.
from humanconnect.upstream.guard import free_slot as free_slot
from tests.support.env import CLIENT_ID, CLIENT_SECRET, TICKET_KEY


def standin() -> StandIn:
    """The upstream stand-in with this app's credentials, no faults, a fixed seed."""
    return StandIn(CLIENT_ID, CLIENT_SECRET, Faults(), seed=7)


def ticket(user: str, *, email: str | None = None, ttl_s: int = 600) -> dict[str, str]:
    """An `Authorization` header carrying a connect ticket for `user`."""
    return {"Authorization": f"Bearer {mint(TICKET_KEY, user, ttl_s, email=email)}"}


def ticket_headers(bodies: list[dict[str, str]], key: str = TICKET_KEY) -> list[dict[str, str]]:
    """Each finish's `Authorization` header: a ticket (10 minutes) for the user the
    stand-in will name for its humanId."""
    return [
        {"Authorization": f"Bearer {mint(key, client_user_id_for(b['humanId']), 600)}"}
        for b in bodies
    ]


def human_id() -> str:
    return secrets.token_hex(12)


def session_token() -> str:
    return secrets.token_hex(16)


def finish_body(**over: str) -> dict[str, str]:
    """A valid `sessionTokenObject` for this app."""
    body = {"humanId": human_id(), "clientId": CLIENT_ID, "sessionToken": session_token()}
    body.update(over)
    return body


def job(**over: object) -> Job:
    """A queued job as the worker sees it, received now."""
    values: dict[str, object] = {
        "request_id": secrets.token_urlsafe(16),
        "human_id": human_id(),
        "client_id": CLIENT_ID,
        "session_token": session_token(),
        "received_us": now_us(),
    }
    values.update(over)
    return Job(**values)  # type: ignore[arg-type]


def session_row(db: Session, job: Job, cipher: Cipher, key: str | None = None) -> SessionRecord:
    """The `sessions` record a first delivery of `job` creates (in the caller's transaction)."""
    row, _ = sessions.load_or_create(
        db,
        key=key or session_hash(job.session_token),
        request_id=job.request_id,
        human_id=job.human_id,
        received_us=job.received_us,
        sealed_session_token=cipher.seal(job.session_token),
    )
    return row


def stored_user(rt: Runtime, *, public_token: str | None = None) -> str:
    """One user with tokens in the store (access token "access-secret-1"); its clientUserId."""
    with rt.db() as db:
        tokens.save_tokens(
            db,
            rt.cipher,
            human_id="a" * 24,
            client_user_id="user@example.com",
            access_token="access-secret-1",
            public_token=public_token,
            received_us=now_us(),
            session_hash="x" * 64,
        )
        db.commit()
    return "user@example.com"
