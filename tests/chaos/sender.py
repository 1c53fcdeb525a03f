"""A client sending finishes, in a process of its own so that its timings are not skewed by
the stand-in and the test sharing its interpreter: `python -m tests.chaos.sender`."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import aiohttp


async def send(
    url: str,
    bodies: list[dict[str, str]],
    rate: float | None,
    sources: list[str] | None = None,
    headers: list[dict[str, str]] | None = None,
) -> list[dict]:
    """POST every body: as fast as 50 connections allow, or paced at `rate` per second, each
    on its own schedule (open loop); body i leaves from `sources[i % len(sources)]` when
    given (any 127.0.0.0/8 address is this machine), with `headers[i]`. A connection refused
    or cut (a web killed) is status 0. aiohttp: httpx's own CPU skewed the timings."""
    timeout = aiohttp.ClientTimeout(total=30)
    start = time.monotonic()
    addresses: list[str | None] = list(sources) if sources else [None]
    # Idle connections dropped before uvicorn closes them (5 s): no reuse race on a POST.
    clients = [
        aiohttp.ClientSession(
            url,
            connector=aiohttp.TCPConnector(
                limit=max(4, (50 if rate is None else 200) // len(addresses)),
                keepalive_timeout=2,
                local_addr=(address, 0) if address else None,
            ),
            timeout=timeout,
        )
        for address in addresses
    ]

    async def one(i: int, body: dict[str, str]) -> dict:
        if rate is not None:
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        client = clients[i % len(clients)]
        t0 = time.monotonic()
        try:
            async with client.post(
                "/connect/finish", json=body, headers=headers[i] if headers else None
            ) as resp:
                await resp.read()
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError):
            status, retry_after = 0, None
        return {
            "status": status,
            "at": t0 - start,
            "seconds": time.monotonic() - t0,
            "retry_after": retry_after,
        }

    try:
        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    finally:
        for client in clients:
            await client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--from", dest="sources", help="comma-separated source addresses")
    parser.add_argument("--headers", type=Path, help="a JSON list: each body's headers")
    args = parser.parse_args()
    bodies = json.loads(args.bodies.read_text())
    headers = json.loads(args.headers.read_text()) if args.headers else None
    sources = args.sources.split(",") if args.sources else None
    results = asyncio.run(send(args.url, bodies, args.rate, sources, headers))
    args.results.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
