"""Engine and session factory: one engine per URL per process."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def normalize_url(url: str) -> str:
    """Let `postgresql://` mean psycopg 3, the one PostgreSQL driver we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is off: it would not BEGIN before a SAVEPOINT, so a
    # nested transaction committed on its own (tokens stored, the session still `running`).
    # SQLAlchemy's documented workaround: we emit BEGIN ourselves, below.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    # WAL lets readers and one writer work at once; the busy timeout makes concurrent
    # writers queue instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def engine_for(url: str) -> Engine:
    """The process's engine for `url`, created on first use."""
    url = normalize_url(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create(url)
            _engines[url] = engine
        return engine


def _create(url: str) -> Engine:
    # `sqlalchemy.create_engine` looked up now, not imported: with tracing on, SQLAlchemy's
    # instrumentation has patched it to trace the engine's statements (humanconnect/otel.py).
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlalchemy.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return sqlalchemy.create_engine(
        url,
        pool_size=10,
        max_overflow=40,
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args={"connect_timeout": 3},
    )


def session_factory(url: str) -> sessionmaker:
    """A sessionmaker bound to the engine for `url`."""
    return sessionmaker(engine_for(url), expire_on_commit=False)


def dispose_all() -> None:
    """Close every pooled connection (after a fork, or at the end of a test)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
