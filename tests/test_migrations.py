"""The Alembic migrations: they build exactly the models' schema, and go down and up again."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from humanconnect.storage import migrate
from humanconnect.storage.db import engine_for
from humanconnect.storage.models import Base


def test_migrations_match_the_models(db_url: str) -> None:
    """After `db upgrade` there is nothing left for autogenerate to add or change."""
    with engine_for(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_downgrade_then_upgrade_again(db_url: str) -> None:
    """The schema can be taken down to nothing and rebuilt."""
    migrate.downgrade(db_url, "base")
    assert set(inspect(engine_for(db_url)).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(db_url)
    assert {"users", "sessions"} <= set(inspect(engine_for(db_url)).get_table_names())
