"""A rate such as `60/minute`, as the per-source finish limits are written, and what the
accept script needs of it.

The limit is a GCRA (the generic cell rate algorithm): a source's key holds the time its next
finish is due if it sent at the steady rate; `amount` may arrive at once, then one every
`interval`. A refused finish takes nothing, so a client that backs off by `Retry-After` gets in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)
#: Spellings of "no limit".
OFF = ("", "off", "none")


@dataclass(frozen=True)
class Rate:
    """`amount` per `period_s` seconds."""

    amount: int
    period_s: int

    @classmethod
    def parse(cls, text: str) -> Rate | None:
        """`N/second|minute|hour|day` (a trailing s allowed), or None for `off`."""
        if text.strip().lower() in OFF:
            return None
        match = _RATE.match(text)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"{text!r} is not a rate like 60/minute (or off)")
        rate = cls(int(match.group(1)), _UNITS[match.group(2).lower()])
        if rate.interval_us < 1:
            # Spaced under a microsecond, the script could not tell it from no limit at all.
            raise ValueError(f"{text!r} is over 1000000/second (use off for no limit)")
        return rate

    @property
    def interval_us(self) -> int:
        """The steady spacing between finishes."""
        return self.period_s * 1_000_000 // self.amount

    @property
    def tolerance_us(self) -> int:
        """How far ahead of now a source's due time may run: a burst of `amount`."""
        return self.period_s * 1_000_000 - self.interval_us

    def __str__(self) -> str:
        unit = next(name for name, seconds in _UNITS.items() if seconds == self.period_s)
        return f"{self.amount}/{unit}"


def script_args(rate: Rate | None) -> tuple[int, int]:
    """A limit's interval and tolerance (µs) as the Lua scripts take them; (0, 0) for none."""
    return (rate.interval_us, rate.tolerance_us) if rate else (0, 0)
