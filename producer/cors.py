"""CORS for the browser routes only: Starlette's CORSMiddleware, applied to the finish
routes and the browser client, never to the token read-back or the operations routes."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

#: The paths a listed origin may call.
BROWSER_PATHS = ("/connect/finish", "/connect/token", "/humanconnect.js")
ALLOW_HEADERS = ["Content-Type", "Authorization", "Prefer"]
EXPOSE_HEADERS = ["Location", "Preference-Applied", "Retry-After"]


class BrowserCORS:
    """CORSMiddleware for `BROWSER_PATHS`; every other path passes by untouched."""

    def __init__(self, app: ASGIApp, origins: list[str]):
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=ALLOW_HEADERS,
            expose_headers=EXPOSE_HEADERS,
            # Tickets are bearer values, never cookies: no credentials.
            allow_credentials=False,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith(BROWSER_PATHS):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
