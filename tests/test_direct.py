"""`POST /connect/finish` goes straight to its endpoint, past FastAPI's routing, and answers
as it did through it: its other methods and paths are still FastAPI's, a failure in it is
still a 500, and only an endpoint that takes the request alone can be served this way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from producer.direct import _route_path, endpoint_of
from tests import factories


def _finish_route(app: FastAPI) -> APIRoute:
    def walk(routes: list[Any]) -> list[APIRoute]:
        found = [r for r in routes if isinstance(r, APIRoute)]
        for r in routes:
            inner = getattr(r, "original_router", None)
            if inner is not None:
                found += walk(inner.routes)
        return found

    return next(r for r in walk(app.routes) if r.path == "/connect/finish")


def test_a_finish_never_goes_through_fastapis_route(
    make_client: Callable[..., TestClient],
) -> None:
    """FastAPI's route for the finish is never called, and the finish is answered 202."""
    client = make_client()
    app = client.app
    assert isinstance(app, FastAPI)
    route = _finish_route(app)
    called: list[str] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope["path"])
        raise AssertionError("FastAPI's route ran")

    route.app = spy
    resp = client.post("/connect/finish", json=factories.finish_body())
    assert resp.status_code == 202, resp.text
    assert called == []


def test_other_methods_and_paths_are_still_fastapis(client: TestClient) -> None:
    """GET on the finish path is FastAPI's 405 naming POST; the status route still answers."""
    resp = client.get("/connect/finish")
    assert resp.status_code == 405
    assert "POST" in resp.headers["allow"]
    assert client.get("/connect/finish/unknownrequest").status_code == 404


def test_a_failure_in_the_endpoint_is_still_a_500(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception the endpoint does not expect is answered 500 by FastAPI's outer layer,
    as when FastAPI routed it."""
    client = make_client()
    parts = client.app.state.parts  # type: ignore[attr-defined]

    def broken(*_: object) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(parts.tickets, "user", broken)
    quiet = TestClient(client.app, raise_server_exceptions=False)
    resp = quiet.post("/connect/finish", json=factories.finish_body())
    assert resp.status_code == 500


def test_only_an_endpoint_that_takes_the_request_alone_is_taken() -> None:
    """An endpoint with another parameter (a dependency, a body model) would lose it here."""
    router = APIRouter()

    @router.post("/alone")
    async def alone(request: Request) -> JSONResponse:
        return JSONResponse({})

    @router.post("/more")
    async def more(request: Request, n: int) -> JSONResponse:
        return JSONResponse({})

    assert endpoint_of(router.routes, "POST", "/alone") is alone
    with pytest.raises(TypeError, match="only the Request"):
        endpoint_of(router.routes, "POST", "/more")
    with pytest.raises(LookupError):
        endpoint_of(router.routes, "GET", "/alone")


def test_the_path_is_read_without_the_root_path() -> None:
    """Behind a root path (uvicorn --root-path), as Starlette's router reads it."""
    assert _route_path({"path": "/connect/finish", "root_path": ""}) == "/connect/finish"
    scope = {"path": "/api/connect/finish", "root_path": "/api"}
    assert _route_path(scope) == "/connect/finish"
    assert _route_path({"path": "/apix/connect/finish", "root_path": "/api"}) != "/connect/finish"
