"""A local stand-in of the Human API's two Connect endpoints, written from the provider's guide.

It serves the tests and the sandbox, never a deployment with a real clientSecret. It can add
latency and faults (`faults.py`: 503, 429 with Retry-After, hangs, dropped connections) and
treats every session token as single-use, like the real one. `/_standin/*` lets tests read
what it issued.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from humanconnect.sandbox import auth, connect
from humanconnect.sandbox.faults import Faults, apply_fault, drop_connection

log = logging.getLogger("humanconnect.sandbox.standin")


@dataclass
class Issued:
    human_id: str
    client_user_id: str
    access_token: str
    public_token: str


@dataclass
class State:
    client_id: str
    client_secret: str
    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=random.Random)
    #: Successful exchanges per session token (tests assert it never exceeds 1).
    exchanges: Counter[str] = field(default_factory=Counter)
    #: publictokens calls per humanId (tests assert who was asked how often), and the last
    #: publicToken issued to each.
    public_calls: Counter[str] = field(default_factory=Counter)
    public_tokens: dict[str, str] = field(default_factory=dict)
    #: Calls received per endpoint and outcome.
    calls: Counter[str] = field(default_factory=Counter)
    #: The tokens issued by session token, and the newest per humanId.
    by_session: dict[str, Issued] = field(default_factory=dict)
    by_human: dict[str, Issued] = field(default_factory=dict)
    #: Humans the publictokens endpoint knows without an exchange (seeded by tests).
    known_humans: set[str] = field(default_factory=set)
    #: Timestamps (loop time) of every call, for request-rate checks.
    call_times: list[float] = field(default_factory=list)
    #: The clientUserId each Connect popup session was opened for (connect.py).
    connect_users: dict[str, str] = field(default_factory=dict)
    #: Lets the calls held by `Faults.hold_token_prefix` go on (set from any thread).
    release: threading.Event = field(default_factory=threading.Event)
    #: The current Connect flow's auth host (humanconnect/sandbox/auth.py).
    auth: auth.AuthState = field(default_factory=auth.AuthState)
    #: The calls `Faults.rate_limit_rps` let through in the current second, and which second.
    allowed: list[float] = field(default_factory=lambda: [0.0, 0.0])


def client_user_id_for(human_id: str) -> str:
    """The sandbox's local user for a humanId (the real one echoes the app's clientUserId)."""
    return f"{human_id}@sandbox.example"


class StandIn:
    """The aiohttp application and its state."""

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        faults: Faults | None = None,
        seed: int | None = None,
    ):
        self.state = State(client_id, client_secret, faults or Faults(), random.Random(seed))
        self.app = web.Application()
        self.app.add_routes(
            [
                web.post("/v1/connect/tokens", self.tokens),
                web.post("/v1/connect/publictokens", self.publictokens),
                web.post(auth.TOKEN_PATH, self.connect_token),
                web.get("/_standin/stats", self.stats),
                web.get("/_standin/issued/{human_id}", self.issued),
                web.post("/_standin/faults", self.set_faults),
                web.post("/_standin/humans", self.seed_humans),
                web.get("/_standin/auth", self.auth_stats),
                web.post("/_standin/auth", self.auth_control),
            ]
        )
        connect.add_routes(self.app, self.state)
        auth.add_routes(self.app, self.state)

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if request.content_type != "application/json":
            return web.json_response({"error": "Content-Type must be application/json"}, status=415)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "invalid JSON"}, status=400)
        if body.get("clientId") != self.state.client_id or not secrets.compare_digest(
            str(body.get("clientSecret", "")), self.state.client_secret
        ):
            return web.json_response({"error": "invalid client credentials"}, status=401)
        return body

    # -- endpoints -----------------------------------------------------------------------
    async def tokens(self, request: web.Request) -> web.StreamResponse:
        faulted = await apply_fault(request, self.state, "tokens")
        if faulted is not None:
            return faulted
        body = await self._body(request)
        if isinstance(body, web.Response):
            self.state.calls[f"tokens:{body.status}"] += 1
            return body
        human_id, token = body.get("humanId"), body.get("sessionToken")
        if not isinstance(human_id, str) or not isinstance(token, str) or not human_id or not token:
            self.state.calls["tokens:400"] += 1
            return web.json_response({"error": "humanId and sessionToken are required"}, status=400)
        prefix = self.state.faults.refuse_token_prefix
        if prefix and token.startswith(prefix):
            self.state.calls["tokens:forged"] += 1
            return web.json_response({"error": "invalid session token"}, status=400)
        unavailable = self.state.faults.unavailable_token_prefix
        if unavailable and token.startswith(unavailable):
            self.state.calls["tokens:503"] += 1
            return web.json_response({"error": "service unavailable"}, status=503)
        held = self.state.faults.hold_token_prefix
        if held and token.startswith(held):
            self.state.calls["tokens:held"] += 1
            waited = 0.0
            while not self.state.release.is_set() and waited < self.state.faults.hang_s:
                await asyncio.sleep(0.05)
                waited += 0.05
        if token in self.state.by_session:
            self.state.calls["tokens:used"] += 1
            return web.json_response({"error": "session token already used"}, status=400)
        issued = Issued(
            human_id=human_id,
            client_user_id=self.state.connect_users.get(token) or client_user_id_for(human_id),
            access_token=secrets.token_urlsafe(32),
            public_token=secrets.token_hex(16),
        )
        self.state.by_session[token] = issued
        self.state.by_human[human_id] = issued
        self.state.exchanges[token] += 1
        dropped = self.state.faults.drop_token_prefix
        if (dropped and token.startswith(dropped)) or (
            self.state.rng.random() < self.state.faults.drop_after
        ):
            self.state.calls["tokens:drop_after"] += 1
            drop_connection(request)
            raise asyncio.CancelledError
        self.state.calls["tokens:201"] += 1
        return web.json_response(
            {
                "humanId": issued.human_id,
                "accessToken": issued.access_token,
                "publicToken": issued.public_token,
                "clientId": self.state.client_id,
                "clientUserId": issued.client_user_id,
            },
            status=201,
        )

    async def publictokens(self, request: web.Request) -> web.StreamResponse:
        faulted = await apply_fault(request, self.state, "publictokens")
        if faulted is not None:
            return faulted
        body = await self._body(request)
        if isinstance(body, web.Response):
            self.state.calls[f"publictokens:{body.status}"] += 1
            return body
        human_id = body.get("humanId")
        if isinstance(human_id, str):
            self.state.public_calls[human_id] += 1
        if not isinstance(human_id, str) or (
            human_id not in self.state.by_human
            and human_id not in self.state.known_humans
            and human_id not in auth.connected_humans(self.state.auth)
        ):
            self.state.calls["publictokens:404"] += 1
            return web.json_response({"error": "unknown humanId"}, status=404)
        token = secrets.token_hex(16)
        self.state.public_tokens[human_id] = token
        if human_id in self.state.by_human:
            self.state.by_human[human_id].public_token = token
        self.state.calls["publictokens:200"] += 1
        return web.json_response({"humanId": human_id, "publicToken": token})

    async def connect_token(self, request: web.Request) -> web.StreamResponse:
        """The current flow's mint (`HUMANAPI_AUTH_URL`): the same faults as the others."""
        faulted = await apply_fault(request, self.state, "token")
        if faulted is not None:
            return faulted
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.state.calls["token:400"] += 1
            return web.json_response({"statusCode": 400, "error": "invalid JSON"}, status=400)
        answer = auth.mint(self.state, body)
        self.state.calls[f"token:{answer.status}"] += 1
        return answer

    # -- test controls -------------------------------------------------------------------
    async def stats(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "calls": dict(self.state.calls),
                "exchanges": sum(self.state.exchanges.values()),
                "sessions": len(self.state.exchanges),
                "doubleExchanges": sum(1 for n in self.state.exchanges.values() if n > 1),
                "faults": asdict(self.state.faults),
            }
        )

    async def issued(self, request: web.Request) -> web.Response:
        found = self.state.by_human.get(request.match_info["human_id"])
        if found is None:
            return web.json_response({"error": "unknown"}, status=404)
        return web.json_response(asdict(found))

    async def set_faults(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.state.faults = Faults(**data)
        return web.json_response(asdict(self.state.faults))

    async def auth_stats(self, _: web.Request) -> web.Response:
        a = self.state.auth
        return web.json_response(
            {"mints": dict(a.mints), "refusals": dict(a.refusals), "sources": a.sources}
        )

    async def auth_control(self, request: web.Request) -> web.Response:
        """`{"lifetimes": {...}}` shortens token lifetimes; `{"connect": {user: [names]}}`
        connects sources as the popup would."""
        data = await request.json()
        a = self.state.auth
        if "lifetimes" in data:
            a.lifetimes = auth.Lifetimes(**data["lifetimes"])
        for user, names in (data.get("connect") or {}).items():
            a.connect(user, names)
        return web.json_response({"lifetimes": asdict(a.lifetimes)})

    async def seed_humans(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.state.known_humans.update(data.get("humanIds", []))
        return web.json_response({"known": len(self.state.known_humans)})


class Running:
    """A stand-in served on a port from a background thread (tests and `humanconnect up`)."""

    def __init__(self, standin: StandIn, host: str = "127.0.0.1", port: int = 0):
        self.standin = standin
        self._host, self._port = host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="standin", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def state(self) -> State:
        return self.standin.state

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop it serves on (its stamps are this loop's time)."""
        return self._loop

    def start(self) -> Running:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stand-in did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.standin.app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, backlog=1024)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


@contextmanager
def no_collection() -> Iterator[None]:
    """This process's garbage collection done now and off until the block ends, for a
    process whose own pauses would show up in what it times: one serving a `Running`
    stand-in (a collection holds its loop, and calls that came on time are stamped
    together) or a load generator (the bench's open loop)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> None:
    """`python -m humanconnect.sandbox.standin`: serve the stand-in in the foreground."""
    parser = argparse.ArgumentParser(
        description="Local stand-in of the Human API (not the real one)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--p503", type=float, default=0.0)
    parser.add_argument("--p429", type=float, default=0.0)
    parser.add_argument("--pdrop", type=float, default=0.0)
    parser.add_argument("--phang", type=float, default=0.0)
    parser.add_argument("--hang-s", type=float, default=30.0)
    parser.add_argument("--retry-after-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rate-limit-rps", type=float, default=0.0)
    args = parser.parse_args(argv)
    faults = Faults(
        latency_ms=args.latency_ms,
        p503=args.p503,
        p429=args.p429,
        pdrop=args.pdrop,
        phang=args.phang,
        hang_s=args.hang_s,
        retry_after_s=args.retry_after_s,
        rate_limit_rps=args.rate_limit_rps,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s standin %(message)s")
    log.info("Human API STAND-IN (not the real upstream) on http://%s:%d", args.host, args.port)
    web.run_app(
        StandIn(args.client_id, args.client_secret, faults, args.seed).app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
