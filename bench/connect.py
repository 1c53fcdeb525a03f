"""Connect opened by 200 users at once, in the provider's current flow: how long each person
waits for the token Connect opens with.

The provider allows 20 calls a second (the stand-in answers `429`, `Retry-After: 1`, past
that) and takes 200 ms a call. Two designs, same run:

- the service: `POST /connect/token`; a worker mints through the shared limit
  (HUMANAPI_MAX_RPS=20), the person waits at most 10 s and, sent away with a `503`, asks
  again after its `Retry-After` (what the browser client's `connectToken()` does);
- inline: each page's server calls the provider itself (what every public integration does),
  honouring `429`'s `Retry-After` as a polite client would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from bench.harness import CLIENT_ID, CLIENT_SECRET, TICKET_KEY, percentile, stack
from humanconnect.sandbox.standin import Faults
from humanconnect.tickets import mint

USERS = 200
PROVIDER_RPS = 20
#: A person gives up after this.
DEADLINE_S = 60.0


async def _wait_for_token(
    session: aiohttp.ClientSession, url: str, make: Any, deadline: float
) -> tuple[float | None, int]:
    """Seconds until a token came (None: none by the deadline), and how many asks it took."""
    started = time.monotonic()
    asks = 0
    while time.monotonic() < deadline:
        asks += 1
        method_kwargs = make()
        try:
            async with session.post(url, **method_kwargs) as resp:
                await resp.read()
                if resp.status == 200:
                    return time.monotonic() - started, asks
                pause = float(resp.headers.get("Retry-After") or 1)
        except (aiohttp.ClientError, TimeoutError):
            pause = 1.0
        await asyncio.sleep(pause)
    return None, asks


async def _burst(url: str, make_for: Any) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    connector = aiohttp.TCPConnector(limit=USERS)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(
            *(_wait_for_token(session, url, make_for(i), deadline) for i in range(USERS))
        )
    waits = [w for w, _ in results if w is not None]
    return {
        "users": USERS,
        "served": len(waits),
        "gave_up": USERS - len(waits),
        "wait_p50_s": round(percentile(waits, 50), 2) if waits else None,
        "wait_p99_s": round(percentile(waits, 99), 2) if waits else None,
        "wait_max_s": round(max(waits), 2) if waits else None,
        # Each person's requests, a retry after a 503 or a 429 included.
        "asks": sum(a for _, a in results),
    }


def _token_calls(calls: dict[str, int]) -> int:
    """Calls the provider's token endpoint got, whatever it answered."""
    return sum(n for name, n in calls.items() if name.startswith("token:"))


def connect_scenario() -> dict[str, Any]:
    s = stack(Faults(latency_ms=200, rate_limit_rps=PROVIDER_RPS), max_rps=PROVIDER_RPS)
    try:
        s.start_worker()
        web = s.start_web()

        def ours(i: int) -> Any:
            header = {"Authorization": f"Bearer {mint(TICKET_KEY, f'svc-{i}@example.com', 3600)}"}
            return lambda: {"headers": header}

        def inline(i: int) -> Any:
            body = {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "client_user_id": f"inline-{i}@example.com",
                "type": "session",
            }
            return lambda: {"json": body}

        service = asyncio.run(_burst(web + "/connect/token", ours))
        provider_after_service = s.standin.stats()["calls"]
        time.sleep(2)  # the provider's second rolls over
        direct = asyncio.run(_burst(s.standin.url + "/v1/connect/token", inline))
        calls = s.standin.stats()["calls"]
    finally:
        s.close()
    service["provider_calls"] = _token_calls(provider_after_service)
    direct["provider_calls"] = _token_calls(calls) - service["provider_calls"]
    service["provider_429s"] = provider_after_service.get("token:rate_limited", 0)
    direct["provider_429s"] = calls.get("token:rate_limited", 0) - service["provider_429s"]
    return {
        "service (POST /connect/token, shared limit 20/s)": service,
        "inline (each page calls the provider)": direct,
        "p99_inline_over_service": round(direct["wait_p99_s"] / service["wait_p99_s"], 2)
        if service["wait_p99_s"] and direct["wait_p99_s"]
        else None,
    }
