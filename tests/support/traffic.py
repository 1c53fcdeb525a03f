"""Sending finishes the way many clients at once would."""

from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import urlsplit

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


def sdk_post(
    url: str, path: str, body: dict[str, str], content_type: str
) -> tuple[int, dict, dict]:
    """POST as the SDK does: Host, Content-Type and Content-Length, nothing else of the
    app's (no Prefer, no Authorization). (status, headers, JSON body)."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=40) as s:
        s.sendall(head + payload)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    header_blob, _, content = raw.partition(b"\r\n\r\n")
    lines = header_blob.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(content)
