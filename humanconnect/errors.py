"""The service's small error tree. Retry policy reads the class, never the message."""


class HumanConnectError(Exception):
    """Base class of every error this service raises on purpose."""


class ConfigError(HumanConnectError):
    """Raised when a required variable is missing or malformed at start."""


class UpstreamError(HumanConnectError):
    """Raised when the Human API answers with anything but the documented success."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        ambiguous: bool = False,
    ):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        #: The request may have reached the upstream although no answer came back.
        self.ambiguous = ambiguous


class TransientUpstreamError(UpstreamError):
    """Raised when the upstream call may succeed if tried again (timeouts, 5xx, 429, ...)."""


class CircuitOpen(TransientUpstreamError):
    """Raised instead of calling while the breaker (upstream.breaker) holds the upstream off."""


class PermanentUpstreamError(UpstreamError):
    """Raised when trying again cannot help (other 4xx, a malformed success body)."""
