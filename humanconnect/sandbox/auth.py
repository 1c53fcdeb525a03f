"""The stand-in of the provider's current Connect flow: `POST /v1/connect/token` on its auth
host, and a Connect popup opened with the minted token.

Written from the contract's section "The provider's current Connect flow": `session` for a
user who has not connected yet (refused once they have, as the provider refuses a session for
an existing user), `id` for one who has, `access` only once a source is connected. The
provider documents no error bodies; the stand-in answers `{statusCode, error, message}`,
the shape integrators have seen. Lifetimes are the provider's unless a test shortens them.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from humanconnect.sandbox.connect import human_id_for

if TYPE_CHECKING:
    from humanconnect.sandbox.standin import State

TOKEN_PATH = "/v1/connect/token"
#: The one source the sandbox popup connects.
SANDBOX_SOURCE = "Sandbox Fitness Tracker"


@dataclass
class Lifetimes:
    """Seconds each kind of token lives (the provider: 1 hour, 1 hour, 24 hours)."""

    session: int = 3600
    id: int = 3600
    access: int = 86400


@dataclass
class Minted:
    client_user_id: str
    kind: str
    expires_at: float


@dataclass
class AuthState:
    """What the auth host knows: its users, their sources, the tokens it minted."""

    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    #: Connected sources per clientUserId; a user with any is one who "has connected".
    sources: dict[str, list[str]] = field(default_factory=dict)
    #: Every session and id token minted, by token (the popup opens with one).
    tokens: dict[str, Minted] = field(default_factory=dict)
    #: The access tokens minted, by token, and the newest per user.
    access: dict[str, Minted] = field(default_factory=dict)
    newest_access: dict[str, str] = field(default_factory=dict)
    #: Successful mints per `type:clientUserId` (tests count upstream calls with it).
    mints: Counter[str] = field(default_factory=Counter)
    #: Refusals per `type:reason`.
    refusals: Counter[str] = field(default_factory=Counter)

    def connect(self, client_user_id: str, names: list[str]) -> None:
        """The user connected these sources in the popup."""
        known = self.sources.setdefault(client_user_id, [])
        known.extend(n for n in names if n not in known)


def connected_humans(auth: AuthState) -> set[str]:
    """The humanIds of the users who connected a source (the publictokens endpoint knows
    them as it knows those of the original flow)."""
    return {human_id_for(user) for user, names in auth.sources.items() if names}


def _refuse(status: int, message: str) -> web.Response:
    phrase = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(status, "Error")
    return web.json_response(
        {"statusCode": status, "error": phrase, "message": message}, status=status
    )


def _connect_token(auth: AuthState, user: str, kind: str, expires_at: float) -> str:
    """A new token to open Connect with, kept (the popup is opened with it) and counted."""
    token = secrets.token_hex(16)
    auth.tokens[token] = Minted(user, kind, expires_at)
    auth.mints[f"{kind}:{user}"] += 1
    return token


def mint(state: State, body: dict[str, Any]) -> web.Response:
    """Answer one `POST /v1/connect/token` whose faults have been decided."""
    auth = state.auth
    if body.get("client_id") != state.client_id or not secrets.compare_digest(
        str(body.get("client_secret", "")), state.client_secret
    ):
        auth.refusals["any:credentials"] += 1
        return _refuse(401, "Invalid client credentials")
    user, kind = body.get("client_user_id"), body.get("type")
    if not isinstance(user, str) or not user:
        auth.refusals[f"{kind}:user"] += 1
        return _refuse(400, "client_user_id is required")
    connected = bool(auth.sources.get(user))
    now = time.time()
    if kind == "session":
        if connected:
            auth.refusals["session:exists"] += 1
            return _refuse(400, "User already exists: request an id token")
        lifetime = auth.lifetimes.session
        token = _connect_token(auth, user, "session", now + lifetime)
        return web.json_response(
            {"session_token": token, "human_id": human_id_for(user), "expires_in": lifetime}
        )
    if kind == "id":
        if not connected:
            auth.refusals["id:unknown"] += 1
            return _refuse(404, "User not found")
        lifetime = auth.lifetimes.id
        token = _connect_token(auth, user, "id", now + lifetime)
        return web.json_response(
            {"id_token": token, "human_id": human_id_for(user), "id_token_expires_in": lifetime}
        )
    if kind == "access":
        if not connected:
            auth.refusals["access:not_connected"] += 1
            return _refuse(400, "User has not connected a source")
        token = secrets.token_urlsafe(48)
        auth.access[token] = Minted(user, "access", now + auth.lifetimes.access)
        auth.newest_access[user] = token
        auth.mints[f"access:{user}"] += 1
        return web.json_response(
            {
                "access_token": token,
                "expires_in": auth.lifetimes.access,
                "token_type": "Bearer",
                "refresh_token": secrets.token_urlsafe(32),
            }
        )
    auth.refusals["any:type"] += 1
    return _refuse(400, "type must be session, id or access")


POPUP = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Human API Connect (sandbox)</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem; color: #1d2733; }
 .badge { background: #fde68a; padding: .1rem .4rem; border-radius: .3rem; font-size: 12px; }
 button { font-size: 15px; padding: .6rem 1rem; border-radius: .4rem; border: 0;
          background: #0f766e; color: white; cursor: pointer; margin-right: .5rem; }
</style></head>
<body>
<p><span class="badge">SANDBOX STAND-IN</span> not the real Human API</p>
<h2>Connect your health data</h2>
<p>Source: <b>Sandbox Fitness Tracker</b></p>
<button id="connect-source">Connect a source</button>
<button id="close-empty">Close without connecting</button>
<p id="state"></p>
<script>
const params = new URLSearchParams(location.search);
async function close(connect) {
  document.getElementById("state").textContent = "closing…";
  const response = await fetch("/connect/token-session", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token: params.get("token"), connect}),
  });
  const payload = await response.json();
  if (!response.ok) {
    document.getElementById("state").textContent = "refused: " + payload.message;
    return;
  }
  window.opener.postMessage({type: "humanconnect:close", payload},
                            params.get("origin") || "*");
  document.getElementById("state").textContent = "done: you can close this window";
  setTimeout(() => window.close(), 300);
}
document.getElementById("connect-source").onclick = () => close(true);
document.getElementById("close-empty").onclick = () => close(false);
</script>
</body></html>
"""


def add_routes(app: web.Application, state: State) -> None:
    """The current flow's popup: opened with a minted token, it closes with the payload the
    provider's Connect client hands its `close` callback."""

    async def popup(_: web.Request) -> web.Response:
        return web.Response(text=POPUP, content_type="text/html")

    async def close(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _refuse(400, "invalid JSON")
        minted = state.auth.tokens.get(str(body.get("token")))
        if minted is None or minted.expires_at < time.time():
            return _refuse(401, "Connect token unknown or expired")
        user = minted.client_user_id
        added = [SANDBOX_SOURCE] if body.get("connect") else []
        state.auth.connect(user, added)
        current = [{"name": n, "id": human_id_for(n)} for n in state.auth.sources.get(user, [])]
        return web.json_response(
            {
                "sessionResults": {
                    "connectedSources": [{"name": n, "id": human_id_for(n)} for n in added],
                    "disconnectedSources": [],
                    "errors": [],
                },
                "currentConnections": current,
            }
        )

    app.add_routes(
        [web.get("/connect/token-popup", popup), web.post("/connect/token-session", close)]
    )
