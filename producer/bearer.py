"""`Authorization: Bearer <token>`, read in one place for the read-back and the tickets."""

from __future__ import annotations

from starlette.requests import Request


def bearer_token(request: Request) -> str | None:
    """The token of the request's `Authorization: Bearer` header (the scheme in any case),
    or None without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
