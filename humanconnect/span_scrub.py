"""What no exported span may carry: tokens, tickets, secrets, URL credentials, bodies.

The instrumentations are set up not to record these (humanconnect/otel.py: Redis commands
without their arguments, URLs without their query, no captured credentials, no bodies);
this is the last guard, on every span as it leaves, whatever an instrumentation, a newer
version of one or an exception message put in it: the span's name, attributes, events (an
exception's message and stack trace), links, status and resource.

It runs in the exporter's thread, never on a request's or a task's path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Status

from humanconnect.logs import REDACTED, RedactingFilter
from humanconnect.settings import Settings

#: Attributes never exported: a query string (a ticket rides in one), bodies, arguments.
DROPPED = frozenset(
    {
        "url.query",
        "http.request.body",
        "http.response.body",
        "messaging.message.body",
        "celery.args",
        "celery.kwargs",
        "db.statement.parameters",
    }
)
DROPPED_PREFIXES = ("db.query.parameter.", "db.operation.parameter.")
#: URL attributes: exported without their query and without a user:password.
URL_KEYS = frozenset({"http.url", "url.full", "http.target", "url.original"})
#: A statement's text: a Redis command keeps its name only (its arguments carry the sealed
#: session token, the claim's key, the client's address).
STATEMENT_KEYS = frozenset({"db.statement", "db.query.text"})
_HEADER = ("http.request.header.", "http.response.header.")
_SENSITIVE_HEADER = re.compile(r"auth|cookie|token|secret|key|signature|ticket", re.IGNORECASE)
# scheme://user:password@host → scheme://[redacted]@host, wherever it stands.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
# A Fernet token (a sealed session or public token).
_FERNET = re.compile(r"gAAAAA[A-Za-z0-9_=-]{20,}")
# SQLAlchemy's error text quotes the statement's parameters up to its "Background" link.
_SQL_PARAMETERS = re.compile(r"\[parameters:.*?(?=\(Background on this error|\Z)", re.DOTALL)
#: Scrubbed texts remembered (most repeat from span to span: hosts, routes, statements), and
#: the longest text remembered.
CACHED = 4096
CACHED_CHARS = 512


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the settings hold, as a span must never show it."""
    values = [
        secret.get_secret_value()
        for secret in (
            settings.client_secret,
            settings.webhook_secret,
            settings.ticket_key,
            settings.api_token,
            settings.redis_password,
            settings.redis_sentinel_password,
        )
        if secret is not None
    ]
    values += settings.key_list() if settings.encryption_keys is not None else []
    for url in (settings.redis_url, settings.database_url):
        password = urlsplit(url).password if url else None
        if password:
            values.append(password)
    # A Standard Webhooks secret is also used without its prefix.
    values += [v.split("_", 1)[1] for v in values if v.startswith("whsec_")]
    return [v for v in values if v]


class Scrubber:
    """Turns a finished span into one safe to export."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._redactor = RedactingFilter(secrets)
        self._resources: dict[int, tuple[Resource, Resource]] = {}
        self._texts: dict[str, str] = {}

    def text(self, value: str) -> str:
        """`value` without known secrets, URL credentials, sealed tokens, tickets (JWTs),
        bearer tokens, `token=`-shaped fields or SQL parameters."""
        found = self._texts.get(value)
        if found is not None:
            return found
        clean = _SQL_PARAMETERS.sub(f"[parameters: {REDACTED}] ", value)
        clean = _USERINFO.sub(rf"\g<1>{REDACTED}@", clean)
        clean = _FERNET.sub(REDACTED, clean)
        clean = self._redactor.redact(clean)
        if len(value) <= CACHED_CHARS:
            if len(self._texts) >= CACHED:
                self._texts.clear()
            self._texts[value] = clean
        return clean

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
            return tuple(self.text(v) if isinstance(v, str) else v for v in value)
        return value

    def attributes(self, attributes: Mapping[str, Any] | None, scope: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (attributes or {}).items():
            if key in DROPPED or key.startswith(DROPPED_PREFIXES):
                continue
            if key.startswith(_HEADER) and _SENSITIVE_HEADER.search(key):
                out[key] = REDACTED
                continue
            if key in URL_KEYS and isinstance(value, str):
                value = without_query(value)
            elif key in STATEMENT_KEYS and isinstance(value, str) and "redis" in scope:
                value = _command_names(value)
            out[key] = self.value(value)
        return out

    def resource(self, resource: Resource) -> Resource:
        cached = self._resources.get(id(resource))
        if cached is None or cached[0] is not resource:
            clean = Resource(self.attributes(resource.attributes), resource.schema_url)
            cached = self._resources[id(resource)] = (resource, clean)
        return cached[1]

    def span(self, span: ReadableSpan) -> ReadableSpan:
        scope = span.instrumentation_scope.name if span.instrumentation_scope else ""
        status = span.status
        if status.description:
            status = Status(status.status_code, self.text(status.description))
        return ReadableSpan(
            name=self.text(span.name),
            context=span.context,
            parent=span.parent,
            resource=self.resource(span.resource),
            attributes=self.attributes(span.attributes, scope),
            events=[
                Event(e.name, self.attributes(e.attributes, scope), e.timestamp)
                for e in span.events
            ],
            links=[Link(link.context, self.attributes(link.attributes)) for link in span.links],
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )


class ScrubbingExporter(SpanExporter):
    """An exporter that sends what `Scrubber` leaves of each span."""

    def __init__(self, inner: SpanExporter, scrubber: Scrubber):
        self.inner = inner
        self.scrubber = scrubber

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([self.scrubber.span(s) for s in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def without_query(url: str) -> str:
    """A URL or request target with neither its query nor its fragment."""
    return url.split("?", 1)[0].split("#", 1)[0]


def _command_names(statement: str) -> str:
    """A Redis statement (one command a line, for a pipeline) as its commands' names."""
    lines = []
    for line in statement.splitlines():
        words = line.split()
        if words:
            lines.append(words[0] + (" ?" if len(words) > 1 else ""))
    return "\n".join(lines)
