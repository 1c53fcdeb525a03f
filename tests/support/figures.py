"""Figures a long test measured, kept for the issue note and the README (tests assert
behaviour; the numbers they saw go here)."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.support.env import ROOT

FIGURES = ROOT / "var" / "test-figures.jsonl"


def record(test: str, **figures: Any) -> None:
    """Append one line of `figures` for `test` to var/test-figures.jsonl."""
    FIGURES.parent.mkdir(exist_ok=True)
    with FIGURES.open("a") as out:
        out.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "test": test, **figures}))
        out.write("\n")
