"""A webhook receiver for the benchmark, in a process of its own: answers 204 at once
(`--mode ok`), or reads the request and never answers (`--mode hang`). The tracing scenario
uses it as its OTLP receiver too. A GET answers how many requests it read, and their bytes
(`<requests> <bytes>`), so a scenario can tell that its receiver was used.

A bare asyncio protocol on uvloop rather than a web framework: the benchmark measures the
service's cost of delivering, and the receiver shares the machine's cores with it, so it
should cost as little as a receiver can."""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop

NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
#: Requests read (GETs aside) and their bodies' bytes, across connections.
READ = {"requests": 0, "bytes": 0}


def _alive() -> bytes:
    text = f"{READ['requests']} {READ['bytes']}".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)


class Receiver(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, just enough of it: header block, then Content-Length."""

    def __init__(self, hang: bool):
        self.hang = hang
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            if head.startswith(b"get "):
                self.transport.write(_alive())
                continue
            READ["requests"] += 1
            READ["bytes"] += length
            if not self.hang:
                self.transport.write(NO_CONTENT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["ok", "hang"], default="ok")
    args = parser.parse_args()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Receiver(args.mode == "hang"), "127.0.0.1", args.port
        )
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
