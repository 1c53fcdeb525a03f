"""The `chaos` fixture: the harness in tests/support/chaos.py, stopped however the test ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from humanconnect.cli.redis_group import RedisGroup
from humanconnect.sandbox.standin import Running
from tests.support.chaos import Chaos


@pytest.fixture
def chaos(tmp_path: Path, db_url: str, standin: Running) -> Iterator[Chaos]:
    harness = Chaos(tmp_path, db_url, standin)
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture
def ha_chaos(
    tmp_path: Path, db_url: str, standin: Running, redis_group: RedisGroup
) -> Iterator[Chaos]:
    """The harness on a primary, two replicas and three Sentinels (down after 1 s)."""
    harness = Chaos(tmp_path, db_url, standin, group=redis_group)
    try:
        yield harness
    finally:
        harness.stop()
