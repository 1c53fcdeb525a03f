"""The provider's current Connect flow: the payload its Connect client hands the page's
`close` callback, which the page posts to `POST /connect/finish` with a ticket.

`{"sessionResults": {"connectedSources": [{"name", "id"}, ...], "disconnectedSources": [...],
...}, "currentConnections": [...]}`. Only the sources' names are kept (for the event); every
list and name is bounded, and anything else in it is dropped.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from producer.body import BadRequest

#: More sources than anyone connects in one session.
MAX_SOURCES = 100


# No control characters (C0, DEL, C1): a pattern, so the OpenAPI document says it too.
Name = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=128, pattern="^[^\\x00-\\x1f\\x7f-\\x9f]+$", strict=True
    ),
]


class Source(BaseModel):
    """One data source in the payload; its id and the rest are not kept."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Name


class SessionResults(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    connectedSources: list[Source] = Field(default_factory=list, max_length=MAX_SOURCES)
    disconnectedSources: list[Source] = Field(default_factory=list, max_length=MAX_SOURCES)


class ClosePayload(BaseModel):
    """What the Connect client reported when it closed."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    sessionResults: SessionResults
    currentConnections: list[Source] = Field(default_factory=list, max_length=MAX_SOURCES)
    #: A connect ticket, as in any finish (read before validation, documented here).
    ticket: str | None = Field(None, max_length=4096)

    @property
    def nothing_connected(self) -> bool:
        """No source connected in this session, and none connected before."""
        return not self.sessionResults.connectedSources and not self.currentConnections

    def connected_names(self) -> str:
        """The names of the sources connected in this session, comma-separated (a comma
        inside a name becomes a space), each once."""
        names = dict.fromkeys(
            s.name.replace(",", " ") for s in self.sessionResults.connectedSources
        )
        return ",".join(names)


def is_close_payload(data: dict[str, Any]) -> bool:
    """A body is the current flow's when it has `sessionResults` and no session token."""
    return "sessionResults" in data and not ({"sessionToken", "session_token"} & data.keys())


def validate_close(data: dict[str, Any]) -> ClosePayload:
    """The close payload from a decoded object; 400 with one message per offending field."""
    try:
        return ClosePayload.model_validate(data)
    except ValidationError as exc:
        fields: dict[str, str] = {}
        for err in exc.errors():
            where = ".".join(str(part) for part in err.get("loc") or ("body",))
            fields.setdefault(where, err["msg"])
        raise BadRequest(400, "invalid close payload", fields) from None
