"""The retention scenario: what a finished session leaves behind, in Redis once its status
record has expired, and in the database once the retention job has run.

Sessions go through the real web, worker and beat (0 ms upstream, webhooks on to a 0 ms
receiver, so every kind of row exists). The finished record's TTL stands in for the hour at
60 s, as does the retention period; once the records have expired the retention task is sent
to the worker, as beat sends it.

The baseline is the layout before retention, measured on the same sessions before their
records expire: the finished record kept, and the claim as the JSON `{requestId, humanId}` it
was (each claim rewritten to that form for the measurement, then back).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import redis

from bench.harness import Stack, body, closed_loop, count, stack, wait_http
from humanconnect.cli.procs import free_port
from humanconnect.queue import RETENTION_TASK, sender
from humanconnect.redis_keys import request_status, session_claim
from humanconnect.sandbox.standin import Faults
from humanconnect.settings import Settings
from humanconnect.status_records import read_claim
from humanconnect.webhooks.signing import new_secret

#: Stands in for HUMANCONNECT_FINISHED_STATUS_TTL_S's hour, and for HUMANCONNECT_RETENTION_S.
EXPIRY_S = 60
TABLES = ("users", "sessions", "outbox", "webhook_deliveries")


def _receiver(s: Stack) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "bench.receiver", "--port", str(port), "--mode", "ok"]
    wait_http(f"http://127.0.0.1:{port}/", s.spawn("receiver", argv))
    return f"http://127.0.0.1:{port}/hooks"


def _rows(db_url: str) -> dict[str, int]:
    return {t: count(db_url, f"SELECT count(*) FROM {t}") for t in TABLES}


def _until(check: Any, timeout_s: float, what: str) -> float:
    """Poll `check` until true; seconds it took. Raises when `timeout_s` passes first."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - started


def _memory(r: redis.Redis, keys: list[str]) -> int:
    """MEMORY USAGE of every key (all its samples), summed; a missing key counts 0."""
    total = 0
    for i in range(0, len(keys), 1000):
        pipe = r.pipeline(transaction=False)
        for key in keys[i : i + 1000]:
            pipe.memory_usage(key, samples=0)
        total += sum(n or 0 for n in pipe.execute())
    return total


def _as_before(r: redis.Redis, claims: list[str], humans: dict[str, str]) -> int:
    """The claims' MEMORY USAGE in their JSON form of before, each put back as it was."""
    originals = [raw for raw in r.mget(claims) if raw is not None]
    if len(originals) != len(claims):
        raise RuntimeError("a claim expired before its measurement")
    pipe = r.pipeline(transaction=False)
    for key, raw in zip(claims, originals, strict=True):
        request_id = read_claim(raw).request_id
        pipe.set(key, json.dumps({"requestId": request_id, "humanId": humans[key]}), keepttl=True)
    pipe.execute()
    size = _memory(r, claims)
    pipe = r.pipeline(transaction=False)
    for key, raw in zip(claims, originals, strict=True):
        pipe.set(key, raw, keepttl=True)
    pipe.execute()
    return size


def retention_scenario(sessions: int = 10_000) -> dict[str, Any]:
    """`sessions` finished, measured before and after their records expire and retention."""
    from humanconnect.crypto import session_hash

    s = stack(Faults())
    try:
        s.env.update(
            HUMANCONNECT_FINISHED_STATUS_TTL_S=str(EXPIRY_S),
            HUMANCONNECT_RETENTION_S=str(EXPIRY_S),
            HUMANCONNECT_WEBHOOK_URLS=_receiver(s),
            HUMANCONNECT_WEBHOOK_SECRET=new_secret(),
        )
        db = s.env["DATABASE_URL"]
        r = redis.Redis.from_url(s.redis_url)
        url = s.start_web()
        s.start_worker()
        # Beat for the webhook ticks; its retention runs hourly, so it is sent below, once.
        s.start_beat()
        bodies = [body(i, "r1") for i in range(sessions)]
        sent = asyncio.run(closed_loop(url, bodies, 100))
        accepted = sent["codes"].get(202, 0)

        def settled() -> bool:
            done = count(db, "SELECT count(*) FROM sessions WHERE state = 'succeeded'")
            delivered = count(
                db, "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'"
            )
            return done >= accepted and delivered >= accepted

        drained_s = _until(settled, 900, "every session stored and its event delivered")
        rows_finished = _rows(db)
        claims = [session_claim(session_hash(b["sessionToken"])) for b in bodies]
        humans = {c: b["humanId"] for c, b in zip(claims, bodies, strict=True)}
        request_ids = [read_claim(raw).request_id for raw in r.mget(claims) if raw]
        records = [request_status(rid) for rid in request_ids]
        before = _memory(r, records) + _as_before(r, claims, humans)
        just_finished = _memory(r, records) + _memory(r, claims)

        # The records expire; then everything is past EXPIRY_S, and the job deletes it.
        _until(lambda: r.exists(*records) == 0, EXPIRY_S + 180, "the finished records to expire")
        after = _memory(r, records) + _memory(r, claims)

        celery = sender(Settings.model_validate({"REDIS_URL": s.redis_url}), "bench-sender")
        runs: list[float] = []

        def purged() -> bool:
            rows = _rows(db)
            if rows["sessions"] == rows["outbox"] == rows["webhook_deliveries"] == 0:
                return True
            # Again every 10 s, as beat would hourly: the last deliveries settled after the
            # last records were written, so they pass EXPIRY_S a little later.
            if not runs or time.monotonic() - runs[-1] > 10:
                celery.send_task(RETENTION_TASK)
                runs.append(time.monotonic())
            return False

        _until(purged, 300, "the retention job to delete every finished session")
        return {
            "sessions": sessions,
            "accepted": accepted,
            "drained_s": drained_s,
            "redis_bytes_per_session": {
                "before retention (record kept, JSON claim)": before / accepted,
                "just finished (record and compact claim)": just_finished / accepted,
                f"after the record expired ({EXPIRY_S} s standing in for the hour)": after
                / accepted,
            },
            "claims_left": r.exists(*claims),
            "records_left": r.exists(*records),
            "rows_when_finished": rows_finished,
            "rows_after_retention": _rows(db),
            "retention_runs_sent": len(runs),
        }
    finally:
        s.close()
