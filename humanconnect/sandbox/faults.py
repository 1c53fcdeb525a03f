"""The stand-in's faults: per-call delays and failures a test or the sandbox sets
(`POST /_standin/faults`), applied before an endpoint answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from humanconnect.sandbox.standin import State


@dataclass
class Faults:
    """Per-request fault odds and delays. Faults happen before the token is consumed,
    except `drop_after`, which consumes it and then drops the answer (the lost-answer case)."""

    latency_ms: float = 0.0
    p503: float = 0.0
    p429: float = 0.0
    retry_after_s: float = 1.0
    pdrop: float = 0.0
    phang: float = 0.0
    hang_s: float = 30.0
    drop_after: float = 0.0
    #: Refuse every call with this status (e.g. 401), or 0 for none.
    refuse_status: int = 0
    #: Answer only 503 while this is true (an outage).
    down: bool = False
    #: Refuse (400, as for a forged session) every session token starting with this.
    refuse_token_prefix: str = ""
    #: Answer 503 to every session token starting with this (before it is used).
    unavailable_token_prefix: str = ""
    #: Use every session token starting with this, then drop the answer (a lost answer).
    drop_token_prefix: str = ""
    #: Hold every call whose session token starts with this until `State.release` is set
    #: (at most `hang_s`), before the token is used: an exchange a test can catch running.
    hold_token_prefix: str = ""
    #: The provider's own rate limit: past this many calls in a second, `429` with
    #: `Retry-After: 1` (0: none). A client that doesn't pace itself meets it.
    rate_limit_rps: float = 0.0


async def apply_fault(
    request: web.Request, state: State, endpoint: str
) -> web.StreamResponse | None:
    """The configured delay and fault for one call to `endpoint`, counted in `state.calls`;
    None when the call goes on to be answered."""
    f = state.faults
    state.call_times.append(asyncio.get_running_loop().time())
    if f.latency_ms:
        await asyncio.sleep(f.latency_ms / 1000)
    if f.down:
        state.calls[f"{endpoint}:503"] += 1
        return web.json_response({"error": "service unavailable"}, status=503)
    if f.rate_limit_rps:
        second = float(int(asyncio.get_running_loop().time()))
        if state.allowed[0] != second:
            state.allowed[:] = [second, 0.0]
        if state.allowed[1] >= f.rate_limit_rps:
            state.calls[f"{endpoint}:rate_limited"] += 1
            return web.json_response(
                {"error": "too many requests"}, status=429, headers={"Retry-After": "1"}
            )
        state.allowed[1] += 1
    roll = state.rng.random()
    for name, odds in (("drop", f.pdrop), ("hang", f.phang), ("503", f.p503), ("429", f.p429)):
        if roll < odds:
            state.calls[f"{endpoint}:{name}"] += 1
            if name == "drop":
                drop_connection(request)
                raise asyncio.CancelledError
            if name == "hang":
                await asyncio.sleep(f.hang_s)
                drop_connection(request)
                raise asyncio.CancelledError
            if name == "503":
                return web.json_response({"error": "service unavailable"}, status=503)
            return web.json_response(
                {"error": "too many requests"},
                status=429,
                headers={"Retry-After": f"{f.retry_after_s:g}"},
            )
        roll -= odds
    if f.refuse_status:
        state.calls[f"{endpoint}:{f.refuse_status}"] += 1
        return web.json_response({"error": "refused"}, status=f.refuse_status)
    return None


def drop_connection(request: web.Request) -> None:
    """Close the connection without an answer."""
    if request.transport is not None:
        request.transport.abort()
