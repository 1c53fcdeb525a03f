"""The engine's transactions: on SQLite, pysqlite's own handling is off and the engine emits
BEGIN itself (humanconnect/storage/db.py), so what holds here is ours to keep."""

from __future__ import annotations

from sqlalchemy import func, select

from humanconnect.storage.db import session_factory
from humanconnect.storage.models import Erasure


def _count(url: str) -> int:
    with session_factory(url)() as db:
        return int(db.scalar(select(func.count()).select_from(Erasure)) or 0)


def test_a_write_is_seen_by_others_only_once_committed_and_a_rollback_undoes_it(
    db_url: str,
) -> None:
    sessions = session_factory(db_url)
    with sessions() as db:
        db.add(Erasure(mark="a" * 32, erased_us=1))
        db.flush()
        assert _count(db_url) == 0  # another connection: not yet
        db.rollback()
    assert _count(db_url) == 0
    with sessions() as db:
        db.add(Erasure(mark="b" * 32, erased_us=1))
        db.commit()
    assert _count(db_url) == 1
