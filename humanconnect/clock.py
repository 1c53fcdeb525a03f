"""Time, through one function that tests can patch where it is imported."""

from datetime import UTC, datetime

import redis


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def to_us(seconds: float) -> int:
    """Seconds as whole microseconds: the integer times compare alike on every database."""
    return int(seconds * 1_000_000)


def timestamp(stamp: datetime) -> float:
    """A time read back from the database as epoch seconds: SQLite hands back naive
    datetimes, and everything we write is UTC."""
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def now_us() -> int:
    """`now()` in microseconds since the epoch."""
    return to_us(now().timestamp())


def iso_from_us(us: int) -> str:
    """µs since the epoch as ISO 8601, UTC."""
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC).isoformat()


def redis_us(r: redis.Redis) -> int:
    """Redis's clock, in µs since the epoch: the one clock every host shares (receive times,
    erasure marks)."""
    seconds, micros = r.time()
    return int(seconds) * 1_000_000 + int(micros)
