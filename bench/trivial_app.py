"""The floor of the `cpu` scenario: the least an ASGI app can do for a finish (read the body,
answer 202 with a small JSON object), behind the same uvicorn command line as the web.

    uvicorn bench.trivial_app:app
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

_BODY = b'{"requestId":"trivial","status":"queued"}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """202 to a POST once its body is read, 200 to anything else (the harness's readiness
    probe); the lifespan protocol acknowledged."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": f"{message['type']}.complete"})
            if message["type"] == "lifespan.shutdown":
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    status = 202 if scope["method"] == "POST" else 200
    await send({"type": "http.response.start", "status": status, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})
