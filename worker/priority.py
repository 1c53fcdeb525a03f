"""Making the worker's `nice` hold against the web on Linux.

The Procfile starts the worker under `nice -n 10` so that, on a shared host, accepting stays
fast while the queue absorbs the drain. But with Linux's autogroup scheduling (on by default
on desktop and many server kernels) niceness only ranks threads within one session: each
session's group gets an equal share of the CPU, whatever its threads' nice values. A worker
that runs in a session of its own (as `humanconnect up` and the benchmark start it) then
took CPU from the web as if it were not niced at all, and a burst's first second was slower
with a worker beside the web than with its group niced too (issue 15; the docs' benchmark
page has the runs).

So a worker that leads its own session gives its group the same niceness. It only ever
lowers its priority, which any process may do; where that is refused or there is no
autogroup, nothing changes. A process whose scheduling group is not an autogroup (one placed
in a cgroup of its own, as CI's runner does) finds the file there but empty: the kernel then
schedules it by that cgroup, and its autogroup's niceness would change nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

AUTOGROUP = Path("/proc/self/autogroup")


def autogroup_niceness() -> int | None:
    """This process's autogroup niceness, or None when it is not scheduled by an autogroup."""
    try:
        fields = AUTOGROUP.read_text().split()  # "/autogroup-85 nice 0", or nothing
    except OSError:
        return None
    return int(fields[-1]) if fields else None


def nice_session_group() -> bool:
    """Give this process's autogroup its niceness; True when that was done."""
    niceness = os.nice(0)
    # Another session's leader may be the web (a shell running both): never slow it down.
    if niceness <= 0 or os.getsid(0) != os.getpid() or autogroup_niceness() is None:
        return False
    try:
        AUTOGROUP.write_text(str(niceness))
    except OSError as exc:
        log.debug("autogroup niceness not set: %s", exc)
        return False
    return True
