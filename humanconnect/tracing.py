"""Traces over OpenTelemetry: on only when the standard OTEL_ variables ask for them.

Off (neither an OTLP endpoint nor OTEL_TRACES_EXPORTER set, or OTEL_SDK_DISABLED=true),
nothing of OpenTelemetry is imported and every hook here returns at once: finishing costs
what it did before (the bench's `tracing` scenario measures it). On, `install` (each process
at its start: the web's factory, the worker's and beat's init signals) builds the SDK in
humanconnect/otel.py: the exporter, the maintained instrumentations, and the scrubbing that
keeps secrets out of every exported span.

One finish is one trace. Beside the context Celery's instrumentation carries in its own
messages (retries, the reconciler's re-send), it travels:
- in the exchange message the web's accept script queues itself (`headers`,
  producer/message.py);
- in the request's status record (`ExchangeRequest.trace_context`), from which the
  reconciler re-sends a lost message (`resumed`, humanconnect/queue.py);
- in the outbox row's stored event (`CONTEXT_FIELD`, never sent: events.payload drops it),
  for the relay sweep (span links, `relay`) and each webhook attempt (a child of the finish,
  `webhook_attempt`).
"""

from __future__ import annotations

import contextvars
import functools
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from fastapi import FastAPI

    from humanconnect.otel import Live
    from humanconnect.settings import Settings

#: The span attribute that names the finish a span belongs to (its requestId).
REQUEST_ID = "humanconnect.request_id"
#: On a batch's session span: how many sessions ran together.
BATCH_SIZE = "humanconnect.batch"
#: The key under which an outbox event keeps its finish's W3C traceparent (stored, not sent).
CONTEXT_FIELD = "_traceparent"
#: What `install` accepts: the Procfile's processes.
ROLES = ("web", "worker", "beat")

P = ParamSpec("P")
T = TypeVar("T")

#: The SDK's handle while tracing is on; None while it is off (the default).
_live: Live | None = None
_OFF: AbstractContextManager[None] = nullcontext()


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, or a traces exporter other
    than `none`, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return any(name.strip() not in ("", "none") for name in exporters.split(","))
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def enabled() -> bool:
    """Whether this process exports traces."""
    return _live is not None


def install(role: str, settings: Settings) -> bool:
    """At a process's start: if the environment asks for traces, export this process's spans
    as service `role` (see humanconnect/otel.py for the name) and instrument what it runs.
    Returns whether tracing is on. A second call changes nothing. A tracing variable
    humanconnect can't honour stops the process with one line naming it."""
    global _live
    if role not in ROLES:
        raise ValueError(f"unknown process role {role!r}")
    if _live is not None or not wanted():
        return _live is not None
    from humanconnect import otel
    from humanconnect.errors import ConfigError
    from humanconnect.startup import exit_on_config_error

    try:
        _live = otel.Live(role, settings)
    except ConfigError as exc:
        # The worker and beat start in a Celery signal, which would turn SystemExit into a
        # traceback: leave at once there.
        exit_on_config_error(str(exc), at_once=role != "web")
    return True


def instrument_web(app: FastAPI) -> None:
    """The web app's server spans (FastAPI's instrumentation), when tracing is on."""
    if _live is not None:
        _live.instrument_web(app)


def headers() -> dict[str, str]:
    """The current trace context as message headers (W3C `traceparent`, and whatever else
    OTEL_PROPAGATORS asks for); empty when off."""
    if _live is None:
        return {}
    return _live.headers()


def traceparent() -> str | None:
    """The current span's W3C traceparent, to store beside what a later process resumes;
    None when off."""
    if _live is None:
        return None
    return _live.traceparent()


def carrier() -> dict[str, str]:
    """What an outbox event stores of the current trace (`CONTEXT_FIELD`); empty when off."""
    if _live is None:
        return {}
    parent = _live.traceparent()
    return {CONTEXT_FIELD: parent} if parent else {}


def tag(request_id: str) -> None:
    """Name the finish the current span works on (`humanconnect.request_id`)."""
    if _live is not None:
        _live.tag(request_id)


def accept_span(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Wrap the web's accept (an async method returning something with a `request_id`): with
    tracing on it runs in a span of its own, and it and the request's server span carry the
    requestId. Off, the call goes straight through (no extra coroutine)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        if _live is None:
            return fn(*args, **kwargs)
        return _live.accept(fn, *args, **kwargs)

    return wrapper


def resumed(parent: str | None) -> AbstractContextManager[None]:
    """Inside: the trace of the finish whose traceparent is `parent` is the current one (the
    reconciler re-sending a lost message continues its finish's trace)."""
    if _live is None or not parent:
        return _OFF
    return _live.resumed(parent)


def member(
    headers: Mapping[str, Any], name: str, request_id: str, batch: int
) -> tuple[contextvars.Context, Callable[[], None]] | None:
    """One finish's part of a batch of `batch` sessions (worker/batch.py): a span `name`, a
    child of the trace its message's `headers` carry, and a context to run the finish's own
    steps in with that span current (its statements, its upstream call, its next try's
    message); the function that ends the span. None when off."""
    if _live is None:
        return None
    return _live.member(headers, name, {REQUEST_ID: request_id, BATCH_SIZE: batch})


def relay(contexts: Iterable[str | None]) -> AbstractContextManager[None]:
    """A span over a batch of events relayed later (the outbox sweep), linked to each event's
    finish (`contexts`: their stored traceparents)."""
    if _live is None:
        return _OFF
    return _live.relay(contexts)


def webhook_attempt(
    parent: str | None, event: Mapping[str, object], attempt: int
) -> AbstractContextManager[None]:
    """A span over attempt number `attempt` to deliver `event`, a child of the finish whose
    traceparent the event stored (none without one: an attempt alone is no trace to keep)."""
    if _live is None or not parent:
        return _OFF
    return _live.webhook_attempt(parent, event, attempt)


def log_ids() -> tuple[str, str] | None:
    """The current sampled span's trace and span id (hex), for log lines; None when off or
    outside a sampled span."""
    if _live is None:
        return None
    return _live.log_ids()
