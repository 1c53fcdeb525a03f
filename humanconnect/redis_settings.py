"""Where Redis is: one address, or a primary that Sentinels name; and how many replicas an
accept must reach. Part of the one settings object (humanconnect/settings.py), which is this
class and the rest; every Redis client is built from it in humanconnect/redis_clients.py."""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

from humanconnect.settings_types import CommaList, env

HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")


class RedisSettings(BaseSettings):
    """The Redis variables of `Settings`."""

    #: Broker, locks, rate limit, status records. This or REDIS_SENTINELS is required when a
    #: process is run directly.
    redis_url: str | None = Field(None, validation_alias=env("REDIS_URL"))
    #: Comma-separated host:port of Redis Sentinels that name the primary (redis_clients.py).
    redis_sentinels: CommaList = Field([], validation_alias=env("REDIS_SENTINELS"))
    #: The primary's name at the Sentinels; required with REDIS_SENTINELS.
    redis_sentinel_master: str | None = Field(None, validation_alias=env("REDIS_SENTINEL_MASTER"))
    #: The Sentinels' own password, if they have one.
    redis_sentinel_password: SecretStr | None = Field(
        None, validation_alias=env("REDIS_SENTINEL_PASSWORD")
    )
    #: The primary's password and database, with REDIS_SENTINELS (a REDIS_URL carries its own).
    redis_password: SecretStr | None = Field(None, validation_alias=env("REDIS_PASSWORD"))
    redis_db: int = Field(0, ge=0, validation_alias=env("REDIS_DB"))
    #: Replicas that must hold an accept before it is answered (Redis WAIT); 0: don't wait.
    redis_min_replicas: int = Field(
        0, ge=0, le=16, validation_alias=env("HUMANCONNECT_REDIS_MIN_REPLICAS")
    )
    #: How long a finish waits for those replicas before it is answered 503 not_replicated.
    #: At most 900: with the web's 1 s for the accept itself, a 503 still comes within 2 s.
    redis_replica_timeout_ms: int = Field(
        500, ge=1, le=900, validation_alias=env("HUMANCONNECT_REDIS_REPLICA_TIMEOUT_MS")
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url_shape(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value or None

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_shape(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            # A name or IPv4 address, or an IPv6 one in brackets; no scheme, path or spaces.
            if not HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not a host:port like 10.0.0.5:26379")
        return value

    @field_validator("redis_sentinel_master")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @model_validator(mode="after")
    def _one_redis(self) -> RedisSettings:
        if self.redis_sentinels and self.redis_url:
            raise ValueError("set REDIS_URL or REDIS_SENTINELS, not both")
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError("REDIS_SENTINEL_MASTER is required with REDIS_SENTINELS")
        if self.redis_sentinel_master and not self.redis_sentinels:
            raise ValueError("REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not")
        return self

    @field_validator("redis_password", "redis_sentinel_password")
    @classmethod
    def _empty_password_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @property
    def replica_wait_s(self) -> float:
        """The longest a finish's accept waits for replicas (0 when it waits for none)."""
        return wait_seconds(self.replica_wait)

    @property
    def replica_wait(self) -> tuple[int, int]:
        """WAIT's arguments for a write that counts once replicated: (replicas, ms)."""
        return (self.redis_min_replicas, self.redis_replica_timeout_ms)

    @property
    def redis_configured(self) -> bool:
        """True when REDIS_URL or REDIS_SENTINELS says where Redis is (`up` starts its own
        otherwise; every other process needs one)."""
        return bool(self.redis_url or self.redis_sentinels)


def wait_seconds(replica_wait: tuple[int, int]) -> float:
    """The longest a WAIT of `(replicas, ms)` holds the connection (0 when it waits for none)."""
    replicas, timeout_ms = replica_wait
    return timeout_ms / 1000 if replicas else 0.0
