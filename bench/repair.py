"""The repair scenario: 100,000 users missing a publicToken, repaired by a worker process."""

from __future__ import annotations

import time
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from bench.harness import FERNET_KEY, stack
from humanconnect.crypto import Cipher
from humanconnect.queue import REPAIR_TASK
from humanconnect.sandbox.standin import Faults


def _seed(db_url: str, n: int) -> list[str]:
    humans = [f"{i:024x}" for i in range(n)]
    sealed = Cipher([FERNET_KEY]).seal("bench-access-token")  # one ciphertext: seeding speed
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (human_id, client_user_id, access_token, public_token,"
                " received_us, session_hash, updated_at, repair_attempts)"
                " VALUES (:h, :u, :a, NULL, 1, :h, '2026-01-01 00:00:00', 0)"
            ),
            [{"h": h, "u": f"{h}@bench", "a": sealed} for h in humans],
        )
    engine.dispose()
    return humans


def _missing(db_url: str) -> int:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM users WHERE public_token IS NULL")).scalar_one()
    engine.dispose()
    return int(n)


def _run(users: int, max_rps: float, timeout_s: float) -> dict[str, Any]:
    s = stack(Faults(), max_rps=max_rps)
    try:
        humans = _seed(s.env["DATABASE_URL"], users)
        # In chunks: the stand-in (aiohttp) refuses bodies over 1 MiB.
        for i in range(0, len(humans), 10_000):
            resp = httpx.post(
                s.standin.url + "/_standin/humans",
                json={"humanIds": humans[i : i + 10_000]},
                timeout=60,
            )
            resp.raise_for_status()
        s.start_worker()

        from humanconnect.queue import sender as queue_sender
        from humanconnect.settings import Settings

        sender = queue_sender(Settings.model_validate({"REDIS_URL": s.redis_url}), "bench-sender")
        time.sleep(2)  # the worker's start-up
        started = time.monotonic()
        sender.send_task(REPAIR_TASK)
        left = users
        deadline = started + timeout_s
        while left and time.monotonic() < deadline:
            time.sleep(1)
            s.sample_rss()
            left = _missing(s.env["DATABASE_URL"])
        elapsed = time.monotonic() - started
        repaired = users - left
        calls = s.standin.stats()["calls"].get("publictokens:200", 0)
        return {
            "users": users,
            "repaired": repaired,
            "seconds": elapsed,
            "users_per_s": repaired / elapsed,
            "upstream_calls": calls,
            "max_rps": max_rps,
            "share_of_limit": (repaired / elapsed) / max_rps,
            "worker_peak_rss_mb": s.peak_rss.get("worker", 0.0),
        }
    finally:
        s.close()


def repair_scenario(users: int = 100_000) -> dict[str, Any]:
    """Unthrottled (the limit set far above what one worker can do), then limit-bound."""
    return {
        "unthrottled": _run(users, 100_000, 480),
        "limited to 100/s": _run(3_000, 100, 120),
    }
