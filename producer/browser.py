"""What a browser needs: `/humanconnect.js`, and in sandbox mode the page that plays an app
using Connect (`/`) with its ticket endpoint. Outside sandbox mode those two are 404."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from humanconnect.settings import Settings
from humanconnect.tickets import mint
from producer.errors import error
from producer.state import Parts

JAVASCRIPT = "text/javascript; charset=utf-8"
#: How long the sandbox page's tickets live.
SANDBOX_TICKET_TTL_S = 600


def _static(name: str) -> str:
    return resources.files("producer").joinpath("static", name).read_text(encoding="utf-8")


def router(parts_of: Any, settings: Settings) -> APIRouter:
    api = APIRouter()
    client = _static("humanconnect.js")
    page = (
        _static("sandbox.html")
        .replace("{{STANDIN_URL}}", settings.base_url)
        .replace("{{CLIENT_ID}}", settings.effective_client_id if settings.sandbox else "")
    )

    @api.get(
        "/humanconnect.js",
        operation_id="browserClient",
        summary="The browser client: an ES module whose default export finishes a session",
        response_class=Response,
        responses={
            200: {
                "description": "`finishConnect(sessionTokenObject, {ticket, wait, baseUrl})`",
                "content": {JAVASCRIPT: {"schema": {"type": "string"}}},
            }
        },
    )
    async def browser_client() -> Response:
        return Response(client, media_type=JAVASCRIPT, headers={"Cache-Control": "max-age=300"})

    @api.get("/", include_in_schema=False)
    async def sandbox_page() -> Response:
        if not settings.sandbox:
            return error(404, "not found")
        return HTMLResponse(page)

    @api.get("/sandbox/ticket", include_in_schema=False)
    async def sandbox_ticket(
        request: Request, client_user_id: str = Query("", alias="clientUserId")
    ) -> JSONResponse:
        parts: Parts = parts_of(request)
        key = parts.tickets.key
        if not settings.sandbox or key is None:
            return error(404, "not found")
        if not client_user_id or len(client_user_id) > 255:
            return error(400, "clientUserId is required", {"clientUserId": "1-255 characters"})
        return JSONResponse({"ticket": mint(key, client_user_id, SANDBOX_TICKET_TTL_S)})

    return api
