"""Deprecated: an app that embeds the store imports `humanconnect.users.get_user_tokens`.

Kept for one release so that embedding apps keep working; it goes in the next.
"""

from __future__ import annotations

import warnings
from typing import Any

from humanconnect import users
from humanconnect.storage.tokens import StoredUser


def get_user_tokens(*args: Any, **kwargs: Any) -> StoredUser | None:
    """`humanconnect.users.get_user_tokens`, with a DeprecationWarning."""
    warnings.warn(
        "worker.users.get_user_tokens moved to humanconnect.users.get_user_tokens; "
        "the old import goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return users.get_user_tokens(*args, **kwargs)
