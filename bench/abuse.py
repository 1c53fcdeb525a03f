"""Abuse: how long 100 real users take to finish (accept to stored) while one address floods
the web with 5,000 junk finishes, against the same 100 users with no junk, same run. The
upstream is at its default share (HUMANAPI_MAX_RPS=20, 200 ms), so every junk session that
gets queued takes a real user's place at the upstream; the per-address limit (the default
60/minute) is what keeps them out. A last pass with the limit off shows what it buys (fewer
junk, or it would take minutes).

Then a crowd: 500 real users behind one address (an office NAT, a carrier's CGNAT), each
with their own ticket, within 10 s at the default limits. A ticketed finish counts against
its user alone, so all of them are taken (before that fix, 69 were and 431 got 429)."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import datetime
from typing import Any

import aiohttp
from sqlalchemy import create_engine, text

from bench.harness import Stack, body, percentile, stack, ticket_headers
from humanconnect.clock import timestamp
from humanconnect.sandbox.standin import Faults

REAL = 100
JUNK = 5000
#: Junk sent in the pass without the limit: enough to queue ahead of every real user.
JUNK_UNLIMITED = 300
REAL_SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]
#: Users behind one address, each with a ticket, sent over CROWD_S seconds.
CROWD, CROWD_S = 500, 10


async def _send(
    url: str,
    bodies: list[dict[str, str]],
    sources: list[str],
    rate: float | None,
    headers: list[dict[str, str]] | None = None,
) -> dict[int, int]:
    """POST every body, body i from sources[i % n] with headers[i]; at `rate` per second, or
    as fast as 50 connections go. Returns how many got each status."""
    codes: dict[int, int] = {}
    sessions = [
        aiohttp.ClientSession(
            url,
            connector=aiohttp.TCPConnector(limit=max(4, 50 // len(sources)), local_addr=(a, 0)),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        for a in sources
    ]
    start = time.monotonic()

    async def one(i: int, b: dict[str, str]) -> None:
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        try:
            sent = headers[i] if headers else None
            async with sessions[i % len(sessions)].post(
                "/connect/finish", json=b, headers=sent
            ) as resp:
                await resp.read()
                codes[resp.status] = codes.get(resp.status, 0) + 1
        except (aiohttp.ClientError, TimeoutError):
            codes[0] = codes.get(0, 0) + 1

    try:
        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    finally:
        for s in sessions:
            await s.close()
    return codes


def _completion_ms(db_url: str, humans: list[str], timeout: float = 600) -> list[float]:
    """Each user's time from its accept (Redis's clock) to its stored success."""
    engine = create_engine(db_url)
    wanted = set(humans)
    deadline = time.monotonic() + timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        with engine.connect() as c:
            found = c.execute(
                text("SELECT human_id, received_us, updated_at FROM sessions WHERE state = :s"),
                {"s": "succeeded"},
            ).all()
            rows = [r for r in found if r[0] in wanted]
        if len(rows) == len(wanted):
            break
        time.sleep(0.5)
    engine.dispose()
    assert len(rows) == len(wanted), f"{len(rows)} of {len(wanted)} real users stored"
    # A raw SELECT on SQLite gives the stored text, not a datetime.
    stamps = [datetime.fromisoformat(r[2]) if isinstance(r[2], str) else r[2] for r in rows]
    return [(timestamp(t) - r[1] / 1e6) * 1000 for t, r in zip(stamps, rows, strict=True)]


def _pass(s: Stack, url: str, run: str, junk: int) -> dict[str, Any]:
    """100 real users at 50/s from ten addresses, with `junk` junk finishes from 127.0.0.1
    starting half a second before them."""
    real = [body(i, run) for i in range(REAL)]
    flood = [
        {**body(i, run + "j"), "sessionToken": "junk-" + secrets.token_hex(12)} for i in range(junk)
    ]

    async def both() -> tuple[dict[int, int], dict[int, int]]:
        junk_task = asyncio.create_task(_send(url, flood, ["127.0.0.1"], None))
        await asyncio.sleep(0.5 if junk else 0)
        users = await _send(url, real, REAL_SOURCES, 50)
        return users, await junk_task

    users, junk_codes = asyncio.run(both())
    times = _completion_ms(s.env["DATABASE_URL"], [b["humanId"] for b in real])
    return {
        "real_codes": users,
        "junk_codes": junk_codes,
        "real_p50_ms": percentile(times, 50),
        "real_p99_ms": percentile(times, 99),
    }


def _crowd(s: Stack, url: str) -> dict[str, Any]:
    """CROWD users with a ticket each, from 127.0.0.1 over CROWD_S seconds."""
    crowd = [body(i, "crowd") for i in range(CROWD)]
    codes = asyncio.run(_send(url, crowd, ["127.0.0.1"], CROWD / CROWD_S, ticket_headers(crowd)))
    out: dict[str, Any] = {"real_codes": codes}
    if codes.get(202) == CROWD:  # else not all of them are coming
        times = _completion_ms(s.env["DATABASE_URL"], [b["humanId"] for b in crowd])
        out.update(real_p50_ms=percentile(times, 50), real_p99_ms=percentile(times, 99))
    return out


def abuse_scenario() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for limit in ("60/minute", "off"):
        s = stack(Faults(latency_ms=200, refuse_token_prefix="junk-"), max_rps=20)
        try:
            # No tickets: junk is refused at its source alone (with tickets it gets 401).
            s.env.pop("HUMANCONNECT_TICKET_KEY")
            s.env["HUMANCONNECT_FINISH_LIMIT_PER_IP"] = limit
            s.start_worker()
            url = s.start_web()
            if limit != "off":
                out["no junk"] = _pass(s, url, "a0", 0)
                out["5,000 junk from one address, limit 60/minute"] = _pass(s, url, "a1", JUNK)
            else:
                out[f"{JUNK_UNLIMITED} junk from one address, limit off"] = _pass(
                    s, url, "a2", JUNK_UNLIMITED
                )
        finally:
            s.close()
    base = out["no junk"]["real_p99_ms"]
    for result in out.values():
        result["p99_vs_no_junk"] = round(result["real_p99_ms"] / base, 2)
    # At the default limits and tickets on (the stack's), the worker at its default share.
    s = stack(Faults(latency_ms=200), max_rps=20)
    try:
        s.env["HUMANCONNECT_FINISH_LIMIT_PER_IP"] = "60/minute"
        s.start_worker()
        out[f"{CROWD} users with tickets behind one address"] = _crowd(s, s.start_web())
    finally:
        s.close()
    return out
