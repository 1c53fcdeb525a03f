"""A webhook receiver for the benchmark, in a process of its own: answers 204 at once
(`--mode ok`), or reads the request and never answers (`--mode hang`)."""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["ok", "hang"], default="ok")
    args = parser.parse_args()

    async def hooks(request: web.Request) -> web.Response:
        await request.read()
        if args.mode == "hang":
            await asyncio.sleep(3600)
        return web.Response(status=204)

    async def alive(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hooks", hooks)
    app.router.add_get("/", alive)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
