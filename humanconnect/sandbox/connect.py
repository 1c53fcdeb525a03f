"""The stand-in's Connect popup, for the sandbox page: it plays the provider's hosted Connect.

The app opens `{stand-in}/connect?clientId=…&clientUserId=…&origin=…` in a popup, as the real
Connect is opened with the app's clientUserId. "Connect a source" registers a session for that
clientUserId and hands `{humanId, clientId, sessionToken}` to the opener by `postMessage`, as
the real popup's `finish` callback does. The tokens endpoint then answers with that
clientUserId: whatever the browser chose, which is why connect tickets exist.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from humanconnect.sandbox.standin import State

POPUP = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Human API Connect (sandbox)</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem; color: #1d2733; }
 .badge { background: #fde68a; padding: .1rem .4rem; border-radius: .3rem; font-size: 12px; }
 button { font-size: 15px; padding: .6rem 1rem; border-radius: .4rem; border: 0;
          background: #0f766e; color: white; cursor: pointer; }
</style></head>
<body>
<p><span class="badge">SANDBOX STAND-IN</span> not the real Human API</p>
<h2>Connect your health data</h2>
<p>Connecting for <b id="user"></b></p>
<p>Source: <b>Sandbox Fitness Tracker</b></p>
<button id="connect-source">Connect a source</button>
<p id="state"></p>
<script>
const params = new URLSearchParams(location.search);
document.getElementById("user").textContent = params.get("clientUserId") || "";
document.getElementById("connect-source").onclick = async () => {
  document.getElementById("state").textContent = "connecting…";
  const response = await fetch("/connect/sessions", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({clientId: params.get("clientId"),
                          clientUserId: params.get("clientUserId")}),
  });
  const sessionTokenObject = await response.json();
  if (!response.ok) {
    document.getElementById("state").textContent = "refused: " + sessionTokenObject.error;
    return;
  }
  window.opener.postMessage({type: "humanconnect:finish", sessionTokenObject},
                            params.get("origin") || "*");
  document.getElementById("state").textContent = "connected: you can close this window";
  setTimeout(() => window.close(), 300);
};
</script>
</body></html>
"""


def human_id_for(client_user_id: str) -> str:
    """The stand-in's humanId for an app user: the same person each time they connect."""
    return hashlib.sha256(b"standin-human\x00" + client_user_id.encode()).hexdigest()[:24]


def add_routes(app: web.Application, state: State) -> None:
    """Serve the popup and its session registration on the stand-in's app."""

    async def popup(_: web.Request) -> web.Response:
        return web.Response(text=POPUP, content_type="text/html")

    async def register(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        client_id, client_user_id = body.get("clientId"), body.get("clientUserId")
        if client_id != state.client_id:
            return web.json_response({"error": "unknown clientId"}, status=400)
        if not isinstance(client_user_id, str) or not client_user_id:
            return web.json_response({"error": "clientUserId is required"}, status=400)
        session_token = secrets.token_hex(16)
        state.connect_users[session_token] = client_user_id
        return web.json_response(
            {
                "humanId": human_id_for(client_user_id),
                "clientId": client_id,
                "sessionToken": session_token,
            }
        )

    app.add_routes([web.get("/connect", popup), web.post("/connect/sessions", register)])
