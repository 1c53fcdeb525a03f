"""The finish route served straight to its endpoint, past FastAPI's routing.

A finish is the one request the web takes by the thousand, and its endpoint takes only the
`Request` and returns a ready `Response`: it validates its own body and answers its own
errors. FastAPI's route around it (matching every route in turn, the request handler, the
dependency solver with nothing to solve, two exit stacks, the exception wrapper) cost it
more CPU than reading, validating and sealing the session together (`python -m bench --only
cpu`; the figures are on the docs' benchmark page).

`DirectRoute` sits innermost among the app's middleware, so CORS, the proxy headers and
FastAPI's outer layers (its server error answer) still wrap the finish, and the route stays
registered with FastAPI for the OpenAPI document, the `Allow` of a 405 and every other
method. Only a request whose method and path are exactly the route's goes the direct way.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]


class DirectRoute:
    """`method path` answered by `endpoint(Request)` itself; everything else goes on to
    `app` (FastAPI's router)."""

    def __init__(self, app: ASGIApp, method: str, path: str, endpoint: Endpoint):
        self.app = app
        self.method = method
        self.path = path
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == self.method
            and _route_path(scope) == self.path
        ):
            response = await self.endpoint(Request(scope, receive, send))
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def endpoint_of(routes: Iterable[BaseRoute], method: str, path: str) -> Endpoint:
    """The endpoint FastAPI routes `method path` to. It must take the request alone: a
    parameter FastAPI would resolve (a dependency, a body model) would not be resolved here."""
    for route in routes:
        if isinstance(route, APIRoute) and route.path == path and method in (route.methods or ()):
            params = list(inspect.signature(route.endpoint).parameters.values())
            if len(params) != 1 or params[0].annotation not in (Request, "Request"):
                raise TypeError(f"{method} {path}: its endpoint must take only the Request")
            endpoint: Endpoint = route.endpoint
            return endpoint
    raise LookupError(f"no route for {method} {path}")


def _route_path(scope: Scope) -> str:
    """The path the router matches: the request's path without the app's root path (as
    Starlette's own routing reads it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path
