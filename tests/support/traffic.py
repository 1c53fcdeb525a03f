"""Sending finishes the way many clients at once would."""

from __future__ import annotations

import asyncio

import httpx


async def _burst(url: str, bodies: list[dict[str, str]], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one(body: dict[str, str]) -> httpx.Response:
            async with sem:
                return await client.post("/connect/finish", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def burst(url: str, bodies: list[dict[str, str]], concurrency: int = 50) -> list[httpx.Response]:
    """POST every body to `url`'s finish endpoint, `concurrency` at a time."""
    return asyncio.run(_burst(url, bodies, concurrency))
