"""Every Redis key and channel the service uses, in one place and under one prefix.

Three names are not ours to choose and carry no prefix: Celery's two queues (each a list
named after the queue) and Kombu's hash of messages delivered but not yet acknowledged. The
events stream is named by HUMANCONNECT_EVENTS_STREAM.
"""

from __future__ import annotations

import hashlib

PREFIX = "hc:"

#: The Celery queue the exchange and housekeeping tasks go through (a Redis list).
QUEUE = "humanconnect"
#: The queue of finishes a person waits on (`Prefer: wait`, `?wait=`): workers drain it first.
WAITING_QUEUE = "humanconnect.waiting"
#: The queues of exchanges (what the reconciler watches).
QUEUES = (WAITING_QUEUE, QUEUE)
#: Webhook deliveries' ticks: a few small messages a second, so they go before the ordinary
#: queue without slowing it, and are never stuck behind a backlog of exchanges.
WEBHOOK_QUEUE = "humanconnect.webhooks"
#: Every queue a default worker consumes, in the order it takes from them.
CONSUMED = (WAITING_QUEUE, WEBHOOK_QUEUE, QUEUE)
#: Kombu's hash of delivered, unacknowledged messages.
UNACKED = "unacked"

#: Accepted requests not yet finished, scored by their last sign of progress (epoch seconds).
PENDING = PREFIX + "pending"
#: The worker metrics hash (see humanconnect/metrics.py).
METRICS = PREFIX + "metrics"
#: The next free upstream slot, in µs by Redis's clock (humanconnect/upstream/limiter.py).
UPSTREAM_LIMIT = PREFIX + "upstream:next"
#: The next free place in the waiting queue's share of the upstream (producer/lanes.py).
WAITING_LANE = PREFIX + "lane:waiting:next"
#: The channel a duplicate's accept publishes to when its answer waits for replicas
#: (producer/claims.py); nobody listens.
REPLICATION_MARK = PREFIX + "replicated"

BREAKER_OPEN = PREFIX + "breaker:open"
BREAKER_LEVEL = PREFIX + "breaker:level"
BREAKER_FAILS = PREFIX + "breaker:fails"
BREAKER_OKS = PREFIX + "breaker:oks"

RELAY_LOCK = PREFIX + "lock:relay"
REPAIR_LOCK = PREFIX + "lock:repair"
RETENTION_LOCK = PREFIX + "lock:retention"


def webhook_lock(endpoint_digest: str) -> str:
    """Held by the one dispatcher of an endpoint (named by a digest: a URL may hold a secret)."""
    return f"{PREFIX}lock:webhook:{endpoint_digest}"


def user_digest(client_user_id: str) -> str:
    """A user in a key name: a user id may be an email address, and keys show in every
    Redis tool."""
    return hashlib.blake2b(client_user_id.encode(), digest_size=12).hexdigest()


def finish_limit(source: str, who: str) -> str:
    """A source's finish limit (its next due time, µs): a client address, or a ticket's user
    by digest."""
    if source == "user":
        who = user_digest(who)
    return f"{PREFIX}limit:{source}:{who}"


def mint_limit(client_user_id: str) -> str:
    """When the user may start another Connect mint (µs; the per-user limit's GCRA)."""
    return f"{PREFIX}limit:mint:{user_digest(client_user_id)}"


def connect_token(client_user_id: str) -> str:
    """The user's last minted Connect token (a hash: sealed token, type, expiry, humanId),
    kept until 60 s before it expires."""
    return f"{PREFIX}connect-token:{user_digest(client_user_id)}"


def mint_flight(token_type: str, client_user_id: str) -> str:
    """Held (the mint's id) while a mint of this type for this user is queued or running:
    concurrent asks wait for that one instead of minting again."""
    return f"{PREFIX}mint:flight:{token_type}:{user_digest(client_user_id)}"


def mint_result(mint_id: str) -> str:
    """How a mint ended (a hash: state, error), for a minute."""
    return f"{PREFIX}mint:{mint_id}"


def access_claim(client_user_id: str) -> str:
    """The current flow's finish claim of one user: its requestId while its access fetch is
    queued or running (a second finish coalesces into it), in `session_claim`'s form."""
    return f"{PREFIX}access-claim:{user_digest(client_user_id)}"


def session_claim(session_hash: str) -> str:
    """The dedupe claim of one session token: `{requestId, humanId}` as JSON."""
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
