"""Logging with a redaction filter: no secret or token can reach a log line, even by mistake."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from celery.app import trace

from humanconnect import tracing

# celery.beat's line for each task it sends (a literal there, not a constant).
BEAT_SENDING = "Scheduler: Sending due task"

# JSON-ish `"accessToken": "..."`, `accessToken=...` and their snake_case twins; `ticket=`
# also catches a connect ticket in a URL's query.
_FIELD = re.compile(
    r"""(?P<key>["']?(?:access_?token|public_?token|session_?token|client_?secret|ticket)["']?\s*[:=]\s*)"""
    r"""(?P<quote>["']?)(?P<value>[^"',\s}&]+)(?P=quote)""",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# A JWT (a connect ticket) wherever it stands: three base64url parts, the first a JSON header.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
REDACTED = "[redacted]"

#: The finish request a log line belongs to, carried from the producer into the worker.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


@contextmanager
def request_context(rid: str) -> Iterator[None]:
    """Tag every log line written inside with the finish request it belongs to."""
    token = request_id.set(rid)
    try:
        yield
    finally:
        request_id.reset(token)


class RedactingFilter(logging.Filter):
    """Replace known secret values and token-shaped fields in every record; with tracing on,
    tag it with the current trace (`trace_id` after the message, or `traceId` in JSON)."""

    def __init__(self, secrets: Iterable[str] = (), *, as_json: bool = False):
        super().__init__()
        self._secrets = [s for s in secrets if s and len(s) >= 8]
        self._as_json = as_json

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _FIELD.sub(lambda m: f"{m['key']}{m['quote']}{REDACTED}{m['quote']}", text)
        text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
        return _JWT.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = self.redact(message)
        record.args = None
        record.request_id = request_id.get()
        ids = tracing.log_ids()
        # Once per record, though every handler runs this filter.
        if ids is not None and getattr(record, "trace_id", None) is None:
            record.trace_id, record.span_id = ids
            if not self._as_json:
                record.msg = f"{record.msg} trace_id={ids[0]}"
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


class _Housekeeping(logging.Filter):
    """Drops Celery's routine INFO lines that would bury the finishes' own: beat's "Sending
    due task" every few seconds, and the worker's "received" and "succeeded" for every task.
    Each exchange logs its outcome itself; errors and retries still pass."""

    ROUTINE = (BEAT_SENDING, trace.LOG_RECEIVED, trace.LOG_SUCCESS)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno <= logging.INFO
            and isinstance(record.msg, str)
            and record.msg.startswith(self.ROUTINE)
        )


#: Celery's loggers that write the routine lines.
CELERY_ROUTINE_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace")


def quiet_celery() -> None:
    """Keep Celery's routine per-task and per-tick lines out of INFO (see `_Housekeeping`)."""
    for name in CELERY_ROUTINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Housekeeping) for f in logger.filters):
            logger.addFilter(_Housekeeping())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["requestId"] = rid
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            out["traceId"] = trace_id
            out["spanId"] = getattr(record, "span_id", "")
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out)


def install(secrets: Iterable[str] = (), *, as_json: bool = False) -> None:
    """Put the redaction filter on every handler of the root logger (and JSON if asked)."""
    filt = RedactingFilter(secrets, as_json=as_json)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        handler.addFilter(filt)
        if as_json:
            handler.setFormatter(JsonFormatter())
