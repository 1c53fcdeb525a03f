"""Figures a long test measured, kept for the issue note and the docs' benchmark page
(tests assert behaviour; the numbers they saw go here)."""

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


def most_in_window(stamps: list[float], width: float = 1.0) -> int:
    """The most of `stamps` (seconds) that fall in any window `width` long."""
    ordered = sorted(stamps)
    if not ordered:
        return 0
    return max(sum(1 for s in ordered[i:] if s - start < width) for i, start in enumerate(ordered))
