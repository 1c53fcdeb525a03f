"""The waiting queue's share of the upstream: what keeps serving waiting users first from
starving everyone else.

Workers drain the waiting queue before the ordinary one, so without a cap a steady stream of
waiting finishes would hold the ordinary queue back for as long as it lasted. The accept
script (producer/claims.py) lets a waiting finish into the waiting queue only while the
waiting queue's admissions stay within `SHARE` of the upstream's pace, with a burst of
`BURST_S` seconds of upstream calls; past that the finish goes to the ordinary queue (it
still waits, and answers 202 if its wait runs out). The count is GCRA, one number in Redis
by Redis's clock, so every web host shares it.

The bound that buys, at `HUMANAPI_MAX_RPS` = R: in any span of t seconds the waiting queue
admits at most R·BURST_S + SHARE·R·t finishes, so the ordinary queue gets at least
(1 − SHARE)·R·t − R·BURST_S of the upstream's R·t calls. A finish without a wait that would
have started t₀ seconds after it was queued with no waiting users starts within
(t₀ + BURST_S) / (1 − SHARE) seconds: 2·t₀ + 10 s with these values.
"""

from __future__ import annotations

from dataclasses import dataclass

from humanconnect.upstream.limiter import slot_interval

#: The most of the upstream's pace the waiting queue takes over time.
SHARE = 0.5
#: The burst the waiting queue may take at once, in seconds of upstream calls.
BURST_S = 5.0


@dataclass(frozen=True)
class WaitingLane:
    """The GCRA parameters of the waiting queue's admissions, in µs."""

    interval_us: int
    tolerance_us: int

    @classmethod
    def for_rate(cls, max_rps: float) -> WaitingLane:
        # Shares of the pace the workers keep, a little under max_rps (upstream/limiter.py).
        pace = 1 / slot_interval(max_rps)
        interval_s = 1 / (SHARE * pace)
        burst = max(1, round(BURST_S * pace))
        return cls(
            interval_us=max(1, round(interval_s * 1e6)),
            tolerance_us=round((burst - 1) * interval_s * 1e6),
        )

    def starvation_bound_s(self, unshared_wait_s: float) -> float:
        """How long a finish without a wait that would have waited `unshared_wait_s` with no
        waiting users can be held back at most."""
        return (unshared_wait_s + BURST_S) / (1 - SHARE)
