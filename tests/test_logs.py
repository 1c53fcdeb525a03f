"""The redaction filter: no secret or token reaches a log line, even by mistake."""

from __future__ import annotations

import json
import logging

import pytest

from humanconnect.logs import REDACTED, JsonFormatter, RedactingFilter

SECRET = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e70001"


@pytest.mark.parametrize(
    "message",
    [
        'body={"humanId": "h", "accessToken": "tok-123456", "clientSecret": "abcd1234"}',
        "accessToken=tok-123456 publicToken=pub-7890abcd",
        "{'session_token': 'tok-123456', 'client_secret': 'abcd1234'}",
        "Authorization: Bearer tok-123456",
        f"posting with secret {SECRET} inline",
    ],
)
def test_secrets_and_tokens_are_redacted(message: str, caplog: pytest.LogCaptureFixture) -> None:
    """Known secrets and token-shaped fields are replaced before any handler sees them."""
    logger = logging.getLogger("test.redaction")
    filt = RedactingFilter([SECRET])
    logger.addFilter(filt)
    try:
        with caplog.at_level(logging.INFO, logger="test.redaction"):
            logger.info("%s", message)
    finally:
        logger.removeFilter(filt)
    text = caplog.text
    for needle in ("tok-123456", "abcd1234", "pub-7890abcd", SECRET):
        assert needle not in text
    assert REDACTED in text


def test_exception_text_is_redacted_too() -> None:
    """A traceback that quotes a token is redacted as well."""
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
    try:
        raise ValueError(f"bad secret {SECRET}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    RedactingFilter([SECRET]).filter(record)
    assert record.exc_text is not None and SECRET not in record.exc_text


def test_json_formatter_writes_one_object_per_line() -> None:
    """HUMANCONNECT_LOG_JSON=1 gives one parseable JSON object per record."""
    record = logging.LogRecord("svc", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line)["message"] == "hello world"


def test_celerys_routine_lines_stay_out_of_info() -> None:
    """Beat's "Sending due task" and the worker's per-task "received"/"succeeded" lines are
    dropped; Celery's errors and retries, and our own lines, still pass."""
    from celery.app import trace

    from humanconnect.logs import BEAT_SENDING, quiet_celery

    quiet_celery()
    quiet_celery()  # idempotent: one filter per logger

    def passes(logger: str, level: int, msg: str) -> bool:
        record = logging.LogRecord(logger, level, __file__, 1, msg, None, None)
        return logging.getLogger(logger).filter(record)

    assert not passes("celery.beat", logging.INFO, BEAT_SENDING + " %s (%s)")
    assert not passes("celery.worker.strategy", logging.INFO, trace.LOG_RECEIVED)
    assert not passes("celery.app.trace", logging.INFO, trace.LOG_SUCCESS)
    assert passes("celery.app.trace", logging.ERROR, trace.LOG_FAILURE)
    assert passes("celery.beat", logging.INFO, "beat: Starting...")
    assert passes("humanconnect.exchange", logging.INFO, "exchange succeeded request=%s")
    assert len(logging.getLogger("celery.beat").filters) == 1


def test_connect_tickets_never_reach_a_log_line() -> None:
    """A ticket in a URL's query, a JSON field or anywhere as a bare JWT is redacted."""
    from humanconnect.tickets import mint

    ticket = mint("log-test-key-0123456789abcdef0123", "alice@example.com")
    f = RedactingFilter()
    for message in (
        f"POST /connect/finish?wait=25&ticket={ticket} HTTP/1.1",
        f'{{"humanId": "h", "ticket": "{ticket}"}}',
        f"could not use {ticket} here",
        f"Authorization: Bearer {ticket}",
    ):
        redacted = f.redact(message)
        assert ticket not in redacted and ticket.split(".")[1] not in redacted, redacted
        assert REDACTED in redacted
