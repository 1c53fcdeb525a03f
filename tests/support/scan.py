"""Reading what the service left behind: Redis, streams, stored users, and the one scan for
secrets in clear."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select, text

from humanconnect.crypto import Cipher
from humanconnect.storage import tokens
from humanconnect.storage.db import session_factory
from humanconnect.storage.models import User
from tests.support.env import FERNET_KEY


def task_body(message: dict[str, Any]) -> str:
    """A queued Celery message's body as JSON text: base64 as Kombu writes it (a worker's
    retries), or plain as the web's accept script queues it."""
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        return base64.b64decode(body).decode()
    return str(body)


def task_kwargs(message: dict[str, Any]) -> dict[str, Any]:
    """The task's keyword arguments in a queued message (body: [args, kwargs, embed])."""
    return dict(json.loads(task_body(message))[1])


def _celery_body(raw: bytes) -> bytes:
    """A queued Celery message with its body decoded, so a grep sees the payload."""
    try:
        body = task_body(json.loads(raw)).encode()
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw
    return raw + b"\n" + body


def redis_text(r: Any) -> bytes:
    """Every key and value in `r`'s database as plain bytes (DUMP may compress, so read by type)."""
    out: list[Any] = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"list":
            out.extend(_celery_body(v) for v in r.lrange(key, 0, -1))
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                out.extend((k, _celery_body(v)))
        elif kind == b"set":
            out.extend(r.smembers(key))
        elif kind == b"zset":
            out.extend(_celery_body(m) for m in r.zrange(key, 0, -1))
        elif kind == b"stream":
            for _id, fields in r.xrange(key):
                for k, v in fields.items():
                    out.extend((k, v))
    return b"\n".join(out)


def stream_entries(r: Any, name: str = "humanconnect:events") -> list[dict[str, str]]:
    """The entries of a Redis Stream as dicts of str."""
    return [
        {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        for _id, fields in r.xrange(name)
    ]


def stored_users(db_url: str) -> dict[str, tokens.StoredUser]:
    """Every stored user, decrypted, by humanId."""
    cipher = Cipher([FERNET_KEY])
    with session_factory(db_url)() as db:
        ids = db.scalars(select(User.client_user_id)).all()
        return {u.human_id: u for u in (tokens.get_user(db, cipher, c) for c in ids) if u}


def state_counts(db_url: str) -> dict[str, int]:
    """How many sessions are in each state."""
    with session_factory(db_url)() as db:
        rows = db.execute(text("SELECT state, count(*) FROM sessions GROUP BY state")).all()
    return {state: n for state, n in rows}


TABLES = ("users", "sessions", "outbox", "webhook_deliveries")


def database_text(db_url: str, tables: Iterable[str] = TABLES) -> bytes:
    """Every row of the service's tables, as text."""
    with session_factory(db_url)() as db:
        return "\n".join(
            str(tuple(row))
            for table in tables
            for row in db.execute(text(f"SELECT * FROM {table}")).all()
        ).encode()


def assert_no_secrets(
    secrets: Iterable[str],
    *,
    redis_client: redis.Redis | None = None,
    db_url: str | None = None,
    files: Iterable[Path] = (),
    texts: Mapping[str, str | bytes] | None = None,
) -> None:
    """None of `secrets` appears in clear in Redis (every key and value, queued messages
    decoded), the database's tables, the files (logs, AOF) or the named texts; the failure
    names the place, never the secret."""
    needles = [s.encode() for s in secrets if s]
    if not needles:
        raise AssertionError("nothing to look for: a scan for no secret proves nothing")
    places: dict[str, bytes] = {}
    if redis_client is not None:
        places["redis"] = redis_text(redis_client)
        if not places["redis"]:
            raise AssertionError("the Redis scan saw nothing: it must see the status records")
    if db_url is not None:
        places["database"] = database_text(db_url)
    for path in files:
        places[str(path)] = path.read_bytes()
    for name, value in (texts or {}).items():
        places[name] = value.encode() if isinstance(value, str) else value
    for name, blob in places.items():
        leaked = sum(needle in blob for needle in needles)
        assert not leaked, f"{leaked} secret(s) or token(s) in clear in {name}"


def largest_batch(logs: Iterable[Path]) -> int:
    """The most sessions a worker ran together, from its log lines (worker/tasks.py's
    `ran N sessions together`); 0 when none ran a batch."""
    found = (
        re.findall(r"ran (\d+) sessions together", p.read_text(errors="replace")) for p in logs
    )
    return max((int(n) for ns in found for n in ns), default=0)
