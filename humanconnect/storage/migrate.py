"""Apply the Alembic migrations, one process at a time."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import make_url

from humanconnect.storage.db import engine_for, normalize_url

MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant: the PostgreSQL advisory lock that serialises concurrent upgrades.
_PG_LOCK_ID = 0x48434D47


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our migrations and `url`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def _exclusive(url: str) -> Iterator[None]:
    """Hold a lock that `web` and `worker` starting together both respect."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ":memory:"
        if db == ":memory:":
            yield
            return
        lock_path = Path(db + ".migrate-lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with engine_for(url).connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
            conn.commit()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at `url` to `revision`."""
    with _exclusive(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Take the schema at `url` back to `revision` (tests and operators only)."""
    with _exclusive(url):
        command.downgrade(alembic_config(url), revision)
