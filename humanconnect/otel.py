"""The OpenTelemetry SDK as humanconnect runs it, built by humanconnect.tracing.install only
when the environment asks for traces (importing this module imports OpenTelemetry).

- The exporter: OTEL_TRACES_EXPORTER (`otlp`, the default, and `console`), OTLP over HTTP with
  protobuf (OTEL_EXPORTER_OTLP_*; `grpc` where its exporter package is installed), behind a
  batch processor (OTEL_BSP_*) and the scrubber (humanconnect/span_scrub.py). The export runs
  on the processor's thread: a collector down or slow costs a request nothing but the spans
  the full queue drops.
- The service name: the process's role (`web`, `worker`, `beat`); with OTEL_SERVICE_NAME (or
  `service.name` in OTEL_RESOURCE_ATTRIBUTES) set, that name with `-<role>` after it, unless
  it already ends so. `humanconnect.process` holds the role either way.
- The sampler: OTEL_TRACES_SAMPLER's, except that a client span without a parent (a Redis
  command, an SQL statement or an HTTP call outside any request or task: the web's memory
  watch, Kombu's and RedBeat's bookkeeping) and beat's per-second webhook tick are not
  recorded: housekeeping, not finishes.
- The instrumentations, the maintained ones: FastAPI and SQLAlchemy in the web (the accept
  has a span of its own, over its one Redis call); Celery, Redis, SQLAlchemy, requests (the
  upstream) and urllib3 (webhooks) in the worker and beat; each set not to record what
  span_scrub.py would remove anyway.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from humanconnect.errors import ConfigError
from humanconnect.queue import DELIVER_TASK
from humanconnect.span_scrub import Scrubber, ScrubbingExporter, secrets_of, without_query
from humanconnect.tracing import REQUEST_ID

if TYPE_CHECKING:
    from fastapi import FastAPI

    from humanconnect.settings import Settings

T = TypeVar("T")

#: The web's probes, left out of traces unless OTEL_PYTHON_FASTAPI_EXCLUDED_URLS says.
PROBES = "/healthz$,/readyz$,/metrics$"
#: Captured request headers (OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*) whose values are
#: replaced, beside any OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS names.
SANITIZED_HEADERS = [".*auth.*", ".*cookie.*", ".*token.*", ".*secret.*", ".*ticket.*", ".*key.*"]
#: The root span beat's webhook tick starts every second per endpoint.
WEBHOOK_TICK = f"apply_async/{DELIVER_TASK}"

_W3C = TraceContextTextMapPropagator()
# The web request's server span, for the accept to tag it (set by the server request hook).
_server_span: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar(
    "humanconnect_server_span", default=None
)


def service_name(role: str, configured: str | None) -> str:
    """`role`, or the configured name with `-<role>` after it (unless it already ends so)."""
    if not configured or configured.startswith("unknown_service"):
        return role
    if configured == role or configured.endswith(f"-{role}"):
        return configured
    return f"{configured}-{role}"


class NoHousekeeping(Sampler):
    """The configured sampler, but a client span with no parent, or beat's webhook tick, is
    dropped (see the module's docstring)."""

    def __init__(self, configured: Sampler):
        self.configured = configured

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        root = not trace.get_current_span(parent_context).get_span_context().is_valid
        if root and (kind is SpanKind.CLIENT or name == WEBHOOK_TICK):
            return SamplingResult(Decision.DROP)
        return self.configured.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"NoHousekeeping{{{self.configured.get_description()}}}"


def exporters(environ: Mapping[str, str] = os.environ) -> list[SpanExporter]:
    """The exporters OTEL_TRACES_EXPORTER names (`otlp` by default)."""
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    out: list[SpanExporter] = []
    for name in names:
        if name in ("", "none"):
            continue
        if name == "otlp":
            out.append(_otlp(environ))
        elif name == "console":
            out.append(ConsoleSpanExporter())
        else:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: {name!r} is not an exporter humanconnect has "
                "(otlp, console or none)"
            )
    return out


def _otlp(environ: Mapping[str, str]) -> SpanExporter:
    variable = next(
        (
            v
            for v in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
            if environ.get(v, "").strip()
        ),
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    )
    protocol = environ.get(variable, "").strip() or "http/protobuf"
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise ConfigError(
                f"{variable}: grpc needs opentelemetry-exporter-otlp-proto-grpc installed "
                "(humanconnect ships http/protobuf)"
            ) from None
        return GrpcExporter()
    raise ConfigError(f"{variable}: {protocol!r} is not supported (http/protobuf or grpc)")


class Live:
    """Tracing on in this process: the provider, its exporters and the instrumentations."""

    def __init__(self, role: str, settings: Settings, environ: Mapping[str, str] = os.environ):
        self.role = role
        self.environ = environ
        found = Resource.create({})  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        name = service_name(role, str(found.attributes.get("service.name") or ""))
        ours: dict[str, str] = {"service.name": name, "humanconnect.process": role}
        if "service.version" not in found.attributes:
            ours["service.version"] = _version()
        # The sampler OTEL_TRACES_SAMPLER(_ARG) names, read as the SDK reads it.
        configured = TracerProvider(shutdown_on_exit=False).sampler
        self.provider = TracerProvider(
            sampler=NoHousekeeping(configured), resource=found.merge(Resource(ours))
        )
        scrubber = Scrubber(secrets_of(settings))
        for exporter in exporters(environ):
            self.provider.add_span_processor(
                BatchSpanProcessor(ScrubbingExporter(exporter, scrubber))
            )
        trace.set_tracer_provider(self.provider)
        self.tracer = self.provider.get_tracer("humanconnect", _version())
        self._instrument(role)

    # -- set-up ------------------------------------------------------------------------------
    def _instrument(self, role: str) -> None:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        kw: dict[str, Any] = {"tracer_provider": self.provider}
        # Engines are created through `sqlalchemy.create_engine` (humanconnect/storage/db.py
        # looks it up at call time), which this patches. Statements are recorded with their
        # placeholders, never their parameters; no SQL comments are added. Its declared range
        # stops short of SQLAlchemy 2.1, whose engine events it uses are unchanged: checked
        # here by tests/test_tracing.py, which finds each finish's statements in its trace.
        SQLAlchemyInstrumentor().instrument(**kw, enable_commenter=False, skip_dep_check=True)
        if role == "web":
            # The web calls no upstream and sends no webhook, and its one Redis call a finish
            # makes is the accept script, which the accept's own span covers: a span for it
            # too would cost every finish a third more to export, and say nothing more.
            return
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor

        RedisInstrumentor().instrument(**kw)
        CeleryInstrumentor().instrument(**kw)
        RequestsInstrumentor().instrument(**kw)
        # A webhook URL may carry a credential in its query.
        URLLib3Instrumentor().instrument(**kw, url_filter=_without_query)

    def instrument_web(self, app: FastAPI) -> None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        env = self.environ
        sanitize = [
            *filter(
                None,
                env.get("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "").split(","),
            ),
            *SANITIZED_HEADERS,
        ]
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            server_request_hook=_server_request,
            excluded_urls=env.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS")
            or env.get("OTEL_PYTHON_EXCLUDED_URLS")
            or PROBES,
            # The ASGI `receive` and `send` spans say nothing a finish needs, at a cost each.
            exclude_spans=["receive", "send"],
            http_capture_headers_sanitize_fields=[s.strip() for s in sanitize if s.strip()],
        )

    # -- hooks (humanconnect.tracing's, when on) ---------------------------------------------
    def headers(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    def traceparent(self) -> str | None:
        carrier: dict[str, str] = {}
        _W3C.inject(carrier)
        return carrier.get("traceparent")

    def tag(self, request_id: str) -> None:
        trace.get_current_span().set_attribute(REQUEST_ID, request_id)

    async def accept(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        with self.tracer.start_as_current_span("humanconnect.accept") as span:
            accepted = await fn(*args, **kwargs)
            request_id = getattr(accepted, "request_id", None)
            if request_id:
                span.set_attribute(REQUEST_ID, request_id)
                duplicate = bool(getattr(accepted, "duplicate", False))
                span.set_attribute("humanconnect.duplicate", duplicate)
                server = _server_span.get()
                if server is not None:
                    server.set_attribute(REQUEST_ID, request_id)
            return accepted

    @contextmanager
    def resumed(self, parent: str) -> Iterator[None]:
        token = otel_context.attach(_W3C.extract({"traceparent": parent}))
        try:
            yield
        finally:
            otel_context.detach(token)

    def member(
        self, headers: Mapping[str, Any], name: str, attributes: Mapping[str, Any]
    ) -> tuple[contextvars.Context, Callable[[], None]]:
        parent = propagate.extract(dict(headers))
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=dict(attributes)
        )
        context = contextvars.copy_context()
        context.run(otel_context.attach, trace.set_span_in_context(span, parent))
        return context, span.end

    @contextmanager
    def relay(self, contexts: Iterable[str | None]) -> Iterator[None]:
        links = [Link(c) for c in map(_span_context, contexts) if c is not None]
        with self.tracer.start_as_current_span(
            "humanconnect.relay", links=links, attributes={"humanconnect.events": len(links)}
        ):
            yield

    @contextmanager
    def webhook_attempt(
        self, parent: str, event: Mapping[str, object], attempt: int
    ) -> Iterator[None]:
        attributes: dict[str, str | int] = {
            "humanconnect.event_type": str(event.get("type", "")),
            "humanconnect.attempt": attempt,
        }
        if isinstance(event.get("requestId"), str):
            attributes[REQUEST_ID] = str(event["requestId"])
        with self.tracer.start_as_current_span(
            "humanconnect.webhook_attempt",
            context=_W3C.extract({"traceparent": parent}),
            attributes=attributes,
        ):
            yield

    def log_ids(self) -> tuple[str, str] | None:
        context = trace.get_current_span().get_span_context()
        if not (context.is_valid and context.trace_flags.sampled):
            return None
        return format_trace_id(context.trace_id), format_span_id(context.span_id)


def _server_request(span: trace.Span, scope: dict[str, Any]) -> None:
    """FastAPI's hook on each server span: kept for the accept to tag, and its target without
    the query (a connect ticket may ride in `?ticket=`)."""
    _server_span.set(span)
    recorded = getattr(span, "attributes", None) or {}
    for key in ("http.target", "http.url", "url.full"):
        value = recorded.get(key)
        if isinstance(value, str) and "?" in value:
            span.set_attribute(key, _without_query(value))


def _span_context(parent: str | None) -> trace.SpanContext | None:
    if not parent:
        return None
    context = trace.get_current_span(_W3C.extract({"traceparent": parent})).get_span_context()
    return context if context.is_valid else None


def _without_query(url: str, *_: Any) -> str:
    """span_scrub.without_query, in the instrumentations' url_filter signature."""
    return without_query(url)


def _version() -> str:
    try:
        return metadata.version("humanconnect")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "0"
