"""The provider guide's design, for comparison: the finish endpoint exchanges inline.

Same HTTP stack as the service (FastAPI on uvicorn, httptools + uvloop). Like the guide's
Node.js endpoint, the call is non-blocking (an async client), the secret is added here, and
any failed call is answered 422 and forgotten: no retry, no queue.

    uvicorn bench.sync_baseline:app   (HUMANAPI_BASE_URL, HUMANAPI_CLIENT_SECRET from env)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

BASE_URL = os.environ.get("HUMANAPI_BASE_URL", "http://127.0.0.1:8900")
SECRET = os.environ.get("HUMANAPI_CLIENT_SECRET", "")
state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, connect=3), limits=limits) as client:
        state["client"] = client
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/connect/finish")
async def finish(request: Request) -> JSONResponse:
    body = await request.json()
    body["clientSecret"] = SECRET
    try:
        resp = await state["client"].post(BASE_URL + "/v1/connect/tokens", json=body)
    except httpx.HTTPError:
        return JSONResponse({"error": "upstream"}, status_code=422)
    if resp.status_code >= 400:
        return JSONResponse({"error": "upstream"}, status_code=422)
    # The guide's app would store the tokens here; the bench counts the 201s as stored.
    return JSONResponse(resp.json(), status_code=201)
