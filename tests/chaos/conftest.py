"""The `chaos` fixture: the harness in tests/support/chaos.py, stopped however the test ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from humanconnect.sandbox.standin import Running
from tests.support.chaos import Chaos


@pytest.fixture
def chaos(tmp_path: Path, db_url: str, standin: Running) -> Iterator[Chaos]:
    harness = Chaos(tmp_path, db_url, standin)
    try:
        yield harness
    finally:
        harness.stop()
