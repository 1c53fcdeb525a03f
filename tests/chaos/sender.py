"""A client sending finishes, in a process of its own so that its timings are not skewed by
the stand-in and the test sharing its interpreter: `python -m tests.chaos.sender`."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import aiohttp


async def send(url: str, bodies: list[dict[str, str]], rate: float | None) -> list[dict]:
    """POST every body: as fast as 50 connections allow, or paced at `rate` per second, each
    on its own schedule (open loop). aiohttp: httpx's own CPU skewed the timings."""
    # Idle connections dropped before uvicorn closes them (5 s): no reuse race on a POST.
    connector = aiohttp.TCPConnector(limit=50 if rate is None else 200, keepalive_timeout=2)
    timeout = aiohttp.ClientTimeout(total=30)
    start = time.monotonic()
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def one(i: int, body: dict[str, str]) -> dict:
            if rate is not None:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            t0 = time.monotonic()
            async with client.post("/connect/finish", json=body) as resp:
                await resp.read()
                return {
                    "status": resp.status,
                    "at": t0 - start,
                    "seconds": time.monotonic() - t0,
                    "retry_after": resp.headers.get("Retry-After"),
                }

        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--rate", type=float)
    args = parser.parse_args()
    bodies = json.loads(args.bodies.read_text())
    results = asyncio.run(send(args.url, bodies, args.rate))
    args.results.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
