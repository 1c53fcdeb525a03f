"""The service's configuration: one typed object read from the environment (and `.env`).

Every default is documented beside its field: here, and for Redis in redis_settings.py
(a base class of this one). Names are the contract's variables.
"""

from __future__ import annotations

import ipaddress
import math
from functools import lru_cache
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from humanconnect.errors import ConfigError
from humanconnect.rate import Rate
from humanconnect.redis_settings import RedisSettings
from humanconnect.settings_types import CommaList, CommaSeconds
from humanconnect.settings_types import env as _env

#: Tickets are HMAC-SHA256: a shorter key is guessable offline from one ticket.
MIN_TICKET_KEY_BYTES = 32
# The provider guide's example app: the sandbox's default clientId, so the guide's example
# sessionTokenObject finishes as-is against the local stand-in.
SANDBOX_CLIENT_ID = "2e9574ecd415c99346879d07689ec1c732c11036"
DEFAULT_BASE_URL = "https://user.humanapi.co"
DEFAULT_AUTH_URL = "https://auth.humanapi.co"


class Settings(RedisSettings):
    """Configuration shared by `web`, `worker` and `beat`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=False)

    #: The app's clientId; a finish whose clientId differs is refused. Sandbox: the guide's.
    client_id: str | None = Field(None, validation_alias=_env("HUMANAPI_CLIENT_ID"))
    #: Read by the worker only. Unset means sandbox mode.
    client_secret: SecretStr | None = Field(None, validation_alias=_env("HUMANAPI_CLIENT_SECRET"))
    #: Upstream root.
    base_url: str = Field(DEFAULT_BASE_URL, validation_alias=_env("HUMANAPI_BASE_URL"))
    #: The current Connect flow's root: `POST {auth_url}/v1/connect/token` mints tokens.
    auth_url: str = Field(DEFAULT_AUTH_URL, validation_alias=_env("HUMANAPI_AUTH_URL"))
    #: Any SQLAlchemy URL; SQLite and PostgreSQL (psycopg 3) are supported.
    database_url: str = Field(
        "sqlite:///var/humanconnect.db", validation_alias=_env("DATABASE_URL")
    )
    #: Comma-separated Fernet keys; the first encrypts, all decrypt.
    encryption_keys: SecretStr | None = Field(
        None, validation_alias=_env("HUMANCONNECT_ENCRYPTION_KEYS")
    )
    #: Bearer token for `GET /users/...`; unset disables the read-back.
    api_token: SecretStr | None = Field(None, validation_alias=_env("HUMANCONNECT_API_TOKEN"))
    #: Redis Stream that events go to.
    events_stream: str = Field(
        "humanconnect:events", validation_alias=_env("HUMANCONNECT_EVENTS_STREAM")
    )
    #: Outbound requests per second to upstream, across all workers together.
    max_rps: float = Field(20.0, gt=0, validation_alias=_env("HUMANAPI_MAX_RPS"))
    #: How often beat runs the publicToken repair.
    repair_interval_s: float = Field(
        300.0, gt=0, validation_alias=_env("HUMANCONNECT_REPAIR_INTERVAL_S")
    )
    #: How long a session keeps being retried through an upstream outage before it is failed.
    #: Two hours: no accepted session may be lost to an upstream outage shorter than one.
    retry_window_s: float = Field(
        7200.0, gt=0, validation_alias=_env("HUMANCONNECT_RETRY_WINDOW_S")
    )
    #: Longest pause between two Celery-level retries. At most half the visibility timeout:
    #: a waiting retry is an unacked message, and would otherwise be delivered twice.
    retry_max_countdown_s: float = Field(
        60.0, gt=0, validation_alias=_env("HUMANCONNECT_RETRY_MAX_COUNTDOWN_S")
    )
    #: How long a message a dead worker held stays invisible before Redis hands it out again.
    #: The session lock (half of it) and the reconciler's patience (five sixths) follow it, so
    #: this one number sets how soon a crash's sessions are picked up again.
    visibility_timeout_s: float = Field(
        180.0, ge=10, le=3600, validation_alias=_env("HUMANCONNECT_VISIBILITY_TIMEOUT_S")
    )
    #: First in-process (tenacity) retry pause; doubled each attempt, jittered.
    retry_initial_s: float = Field(0.5, ge=0, validation_alias=_env("HUMANCONNECT_RETRY_INITIAL_S"))
    #: Budget for the in-process retries of one attempt, in seconds.
    retry_inline_budget_s: float = Field(
        4.0, ge=0, validation_alias=_env("HUMANCONNECT_RETRY_INLINE_BUDGET_S")
    )
    #: Upstream connect and read timeouts, in seconds.
    connect_timeout_s: float = Field(
        3.05, gt=0, validation_alias=_env("HUMANAPI_CONNECT_TIMEOUT_S")
    )
    read_timeout_s: float = Field(10.0, gt=0, validation_alias=_env("HUMANAPI_READ_TIMEOUT_S"))
    #: Worker threads: an exchange is mostly waiting on the upstream, so many threads per core.
    worker_concurrency: int = Field(
        32, ge=1, le=512, validation_alias=_env("HUMANCONNECT_WORKER_CONCURRENCY")
    )
    #: Sessions a worker runs together (1: each message on its own). A batch shares the lock
    #: round trip, both transactions and the success's round trip; a worker takes at most its
    #: concurrency (the messages it may hold unacked at once). worker/batch.py.
    exchange_batch: int = Field(
        16, ge=1, le=64, validation_alias=_env("HUMANCONNECT_EXCHANGE_BATCH")
    )
    #: Threads calling the publictokens endpoint during a repair: enough to keep
    #: HUMANAPI_MAX_RPS busy at a few hundred ms of upstream latency; more only adds GIL
    #: contention.
    repair_threads: int = Field(
        8, ge=1, le=64, validation_alias=_env("HUMANCONNECT_REPAIR_THREADS")
    )
    #: Status records in Redis live this long (a repeated finish is answered from them for
    #: at least 24 hours).
    status_ttl_s: int = Field(
        7 * 24 * 3600, ge=86400, validation_alias=_env("HUMANCONNECT_STATUS_TTL_S")
    )
    #: A finished request's status record lives this long; `GET /connect/finish/{id}` then
    #: answers from the `sessions` table. The session's dedupe claim keeps the longer TTL.
    finished_status_ttl_s: int = Field(
        3600, gt=0, validation_alias=_env("HUMANCONNECT_FINISHED_STATUS_TTL_S")
    )
    #: Finished sessions, relayed outbox rows and settled webhook deliveries older than this
    #: are deleted (jobs/retention.py); stored tokens never are.
    retention_s: int = Field(30 * 86400, gt=0, validation_alias=_env("HUMANCONNECT_RETENTION_S"))
    #: How often beat runs the retention job.
    retention_interval_s: float = Field(
        3600.0, gt=0, validation_alias=_env("HUMANCONNECT_RETENTION_INTERVAL_S")
    )
    #: Apply Alembic migrations when `web` or `worker` starts (under a lock).
    auto_migrate: bool = Field(True, validation_alias=_env("HUMANCONNECT_AUTO_MIGRATE"))
    #: One JSON object per log line.
    log_json: bool = Field(False, validation_alias=_env("HUMANCONNECT_LOG_JSON"))
    #: HS256 key for connect tickets (at least 32 bytes). Set: every finish needs a ticket.
    ticket_key: SecretStr | None = Field(None, validation_alias=_env("HUMANCONNECT_TICKET_KEY"))
    #: Comma-separated exact origins a browser may finish from (CORS). Unset: no CORS headers.
    cors_origins: CommaList = Field([], validation_alias=_env("HUMANCONNECT_CORS_ORIGINS"))
    #: With this many sessions queued, new finishes get 503 and are not queued (0: no cap).
    max_backlog: int = Field(100_000, ge=0, validation_alias=_env("HUMANCONNECT_MAX_BACKLOG"))
    #: Finishes one client address may send (humanconnect/rate.py: `N/minute`, or `off`).
    finish_limit_per_ip_text: str = Field(
        "60/minute", validation_alias=_env("HUMANCONNECT_FINISH_LIMIT_PER_IP")
    )
    #: Finishes one ticket's user may send (only finishes that carry a ticket count).
    finish_limit_per_user_text: str = Field(
        "10/minute", validation_alias=_env("HUMANCONNECT_FINISH_LIMIT_PER_USER")
    )
    #: Comma-separated CIDRs of proxies whose X-Forwarded-For names the client. Unset: the
    #: header is ignored and the socket's peer is the client.
    trusted_proxies: CommaList = Field([], validation_alias=_env("HUMANCONNECT_TRUSTED_PROXIES"))
    #: Run against a Redis whose maxmemory-policy may evict keys (warned at every start).
    allow_evicting_redis: bool = Field(
        False, validation_alias=_env("HUMANCONNECT_ALLOW_EVICTING_REDIS")
    )
    #: Comma-separated http(s) URLs every event is delivered to (webhooks/), in the order
    #: given, without repeats. Unset: none.
    webhook_urls: CommaList = Field([], validation_alias=_env("HUMANCONNECT_WEBHOOK_URLS"))
    #: `whsec_` + base64 of 24-64 random bytes; signs every delivery. Required with URLs.
    webhook_secret: SecretStr | None = Field(
        None, validation_alias=_env("HUMANCONNECT_WEBHOOK_SECRET")
    )
    #: A delivery is a success only on a 2xx within this many seconds.
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=60, validation_alias=_env("HUMANCONNECT_WEBHOOK_TIMEOUT_S")
    )
    #: The waits before each attempt, in seconds (Standard Webhooks' suggested schedule);
    #: its length is how many attempts a delivery gets.
    webhook_retry_schedule: CommaSeconds = Field(
        (0, 5, 300, 1800, 7200, 18000, 36000, 36000),
        validation_alias=_env("HUMANCONNECT_WEBHOOK_RETRY_SCHEDULE"),
    )
    #: Deliveries in flight at once to one endpoint (from one worker process).
    webhook_concurrency: int = Field(
        8, ge=1, le=64, validation_alias=_env("HUMANCONNECT_WEBHOOK_CONCURRENCY")
    )

    @model_validator(mode="after")
    def _timing_fits(self) -> Settings:
        if self.retry_max_countdown_s > self.visibility_timeout_s / 2:
            raise ValueError(
                "HUMANCONNECT_RETRY_MAX_COUNTDOWN_S must be at most half of "
                "HUMANCONNECT_VISIBILITY_TIMEOUT_S"
            )
        if self.session_lock_s >= self.visibility_timeout_s:
            raise ValueError(
                "HUMANCONNECT_VISIBILITY_TIMEOUT_S must exceed twice one upstream call "
                "(connect + read timeout + 5 s)"
            )
        return self

    @property
    def session_lock_s(self) -> float:
        """How long one delivery holds a session between renewals (renewed before every
        upstream call): a killed worker's lock frees itself before its message comes back."""
        return max(self.visibility_timeout_s / 2, self.connect_timeout_s + self.read_timeout_s + 5)

    @property
    def reconcile_after_s(self) -> float:
        """No progress for this long and an accepted request is sent again: past any
        countdown, before the visibility timeout would have brought a lost message back."""
        return self.visibility_timeout_s * 5 / 6

    @property
    def reconcile_interval_s(self) -> float:
        """How often beat looks for requests that stopped making progress."""
        return self.visibility_timeout_s / 6

    @field_validator("client_id")
    @classmethod
    def _client_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @field_validator("base_url", "auth_url")
    @classmethod
    def _base_url_shape(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("client_secret", "api_token")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @field_validator("ticket_key")
    @classmethod
    def _ticket_key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value().encode()) < MIN_TICKET_KEY_BYTES:
            # The length, never the key.
            raise ValueError(f"must be at least {MIN_TICKET_KEY_BYTES} bytes")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_shape(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or origin.endswith("/"):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
            if parts.path or parts.query or parts.fragment:
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        return value

    @field_validator("finish_limit_per_ip_text", "finish_limit_per_user_text")
    @classmethod
    def _rate_shape(cls, value: str) -> str:
        Rate.parse(value)
        return value

    @property
    def finish_limit_per_ip(self) -> Rate | None:
        return Rate.parse(self.finish_limit_per_ip_text)

    @property
    def finish_limit_per_user(self) -> Rate | None:
        return Rate.parse(self.finish_limit_per_user_text)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_shape(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an address or CIDR like 10.0.0.0/8") from None
        return value

    @field_validator("webhook_urls")
    @classmethod
    def _webhook_urls_shape(cls, value: list[str]) -> list[str]:
        for number, url in enumerate(value, 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # Its place, not the URL: a URL may carry a credential.
                raise ValueError(f"URL number {number} is not an http(s) URL")
        return list(dict.fromkeys(value))

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        from humanconnect.webhooks.signing import check_secret

        check_secret(value.get_secret_value())
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule_shape(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or not all(math.isfinite(w) and w >= 0 for w in value):
            raise ValueError("must be comma-separated seconds, none negative or infinite")
        return value

    @model_validator(mode="after")
    def _webhooks_signed(self) -> Settings:
        if self.webhook_urls and self.webhook_secret is None:
            raise ValueError("HUMANCONNECT_WEBHOOK_SECRET is required when webhook URLs are set")
        return self

    @field_validator("encryption_keys")
    @classmethod
    def _keys_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        for key in value.get_secret_value().split(","):
            try:
                Fernet(key.strip())
            except ValueError:
                # Never echo the key itself.
                raise ValueError("each key must be a url-safe base64 32-byte Fernet key") from None
        return value

    @property
    def sandbox(self) -> bool:
        """True when no clientSecret is configured: only the local stand-in can be used."""
        return self.client_secret is None

    @property
    def effective_client_id(self) -> str:
        """The app's clientId, or the guide's example in sandbox mode."""
        if self.client_id:
            return self.client_id
        if self.sandbox:
            return SANDBOX_CLIENT_ID
        raise ConfigError("HUMANAPI_CLIENT_ID is required")

    def key_list(self) -> list[str]:
        """The Fernet keys, first one encrypting."""
        if self.encryption_keys is None:
            raise ConfigError("HUMANCONNECT_ENCRYPTION_KEYS is required")
        return [k.strip() for k in self.encryption_keys.get_secret_value().split(",") if k.strip()]

    def require(self, *, secret: bool) -> None:
        """Fail fast, naming the first missing variable a process needs."""
        if not self.redis_configured:
            raise ConfigError("REDIS_URL or REDIS_SENTINELS is required")
        self.key_list()
        self.effective_client_id  # noqa: B018 - raises when missing
        if secret and self.client_secret is None:
            raise ConfigError("HUMANAPI_CLIENT_SECRET is required by the worker")


def load() -> Settings:
    """Read the environment, turning a validation error into one line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        names = [str(p) for p in first.get("loc", ())]
        message = first.get("msg", "invalid")
        if not names:
            # A rule across variables names them itself.
            raise ConfigError(message.removeprefix("Value error, ")) from None
        raise ConfigError(f"{names[0]}: {message}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built once."""
    return load()
