"""Who a finish is for: the connect ticket it carries, checked without a Redis round trip.

A ticket comes from the first of `Authorization: Bearer …`, the body's `ticket` field, or
`?ticket=` (the provider's mobile SDKs post to a fixed authURL and can't add a header).

Three modes: with HUMANCONNECT_TICKET_KEY every finish needs one; without it finishes need
none (the web warns at start); in sandbox mode without a key, a ticket is checked when one is
sent, under a key made at start (the sandbox page mints its tickets with it, and the
guide's example still finishes without one).
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.requests import Request

from humanconnect.settings import Settings
from humanconnect.tickets import Ticket, TicketError, read, verify
from producer.bearer import bearer_token


class TicketCheck:
    """The web's view of connect tickets."""

    def __init__(self, settings: Settings):
        if settings.ticket_key is not None:
            self.key: str | None = settings.ticket_key.get_secret_value()
            self.required = True
        elif settings.sandbox:
            self.key = secrets.token_urlsafe(32)
            self.required = False
        else:
            self.key = None
            self.required = False

    def user(self, request: Request, data: dict[str, Any] | None) -> str | None:
        """The clientUserId the finish's ticket vouches for; None when tickets are off (or
        optional and absent). Raises TicketError for a missing or bad one where needed."""
        if self.key is None:
            return None
        ticket = find(request, data)
        if ticket is None and not self.required:
            return None
        return verify(self.key, ticket)

    def ticket(self, request: Request, data: dict[str, Any] | None) -> Ticket:
        """The valid ticket a request carries, for a route that always needs one (the
        current flow's `POST /connect/token`); TicketError when it has none or a bad one."""
        if self.key is None:
            raise TicketError("ticket missing")
        return read(self.key, find(request, data))


def find(request: Request, data: dict[str, Any] | None) -> str | None:
    """The ticket a finish carries, if any, from the header, the body or the query."""
    if (token := bearer_token(request)) is not None:
        return token
    if data is not None:
        field = data.get("ticket")
        if isinstance(field, str) and field:
            return field
    return request.query_params.get("ticket") or None
