"""Every Redis key and channel the service uses, in one place and under one prefix.

Three names are not ours to choose and carry no prefix: Celery's two queues (each a list
named after the queue) and Kombu's hash of messages delivered but not yet acknowledged. The
events stream is named by HUMANCONNECT_EVENTS_STREAM.
"""

from __future__ import annotations

PREFIX = "hc:"

#: The Celery queue the exchange and housekeeping tasks go through (a Redis list).
QUEUE = "humanconnect"
#: The queue of finishes a person waits on (`Prefer: wait`, `?wait=`): workers drain it first.
WAITING_QUEUE = "humanconnect.waiting"
#: The queues, in the order workers take from them.
QUEUES = (WAITING_QUEUE, QUEUE)
#: Kombu's hash of delivered, unacknowledged messages.
UNACKED = "unacked"

#: Accepted requests not yet finished, scored by their last sign of progress (epoch seconds).
PENDING = PREFIX + "pending"
#: The worker metrics hash (see worker/metrics.py).
METRICS = PREFIX + "metrics"
#: The next free upstream slot, in µs by Redis's clock (worker/ratelimit.py).
UPSTREAM_LIMIT = PREFIX + "upstream:next"
#: The next free place in the waiting queue's share of the upstream (producer/lanes.py).
WAITING_LANE = PREFIX + "lane:waiting:next"

BREAKER_OPEN = PREFIX + "breaker:open"
BREAKER_LEVEL = PREFIX + "breaker:level"
BREAKER_FAILS = PREFIX + "breaker:fails"
BREAKER_OKS = PREFIX + "breaker:oks"

RELAY_LOCK = PREFIX + "lock:relay"
REPAIR_LOCK = PREFIX + "lock:repair"


def session_claim(session_hash: str) -> str:
    """The dedupe claim of one session token: `{requestId, humanId, phase}` as JSON."""
    return f"{PREFIX}session:{session_hash}"


def session_lock(session_hash: str) -> str:
    """The lock one delivery of a session holds while it works on it."""
    return f"{PREFIX}lock:session:{session_hash}"


def request_status(request_id: str) -> str:
    """A request's status record (a hash)."""
    return f"{PREFIX}request:{request_id}"


def done_channel(request_id: str) -> str:
    """Published to when a request ends (wakes a `Prefer: wait` finish)."""
    return f"{PREFIX}done:{request_id}"


#: Matches every `done_channel`.
DONE_PATTERN = done_channel("*")
