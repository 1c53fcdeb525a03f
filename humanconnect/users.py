"""Reading a user's tokens back: for the web's `GET /users/...` and for apps embedding the store;
and what a clientUserId may be."""

from __future__ import annotations

from humanconnect.runtime import Runtime
from humanconnect.settings import Settings, get_settings
from humanconnect.storage import tokens
from humanconnect.storage.tokens import StoredUser


def get_user_tokens(client_user_id: str, settings: Settings | None = None) -> StoredUser | None:
    """A user's decrypted tokens by clientUserId, or None.

    For apps that run in the same deployment and want the tokens without an HTTP call:
    `from humanconnect.users import get_user_tokens`. Uses the environment's settings by default.
    """
    return read_user(Runtime(settings or get_settings()), client_user_id)


def read_user(rt: Runtime, client_user_id: str) -> StoredUser | None:
    """The same, on an existing runtime."""
    with rt.db() as db:
        return tokens.get_user(db, rt.cipher, client_user_id)


#: The longest clientUserId the tokens table holds.
MAX_CLIENT_USER_ID = 255


def valid_client_user_id(value: str) -> bool:
    """1 to 255 characters, none of them a control character."""
    return 0 < len(value) <= MAX_CLIENT_USER_ID and value.isprintable()
