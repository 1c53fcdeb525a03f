"""How a delivery's end reaches Redis: the request's status record, the claim it was
accepted under, and for a success the event's stream entry, the counters and the lock's
release, in one round trip. The exchange (humanconnect/exchange.py) decides the outcome;
this module only tells it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from humanconnect import events, metrics, redis_keys, status_records
from humanconnect.crypto import session_hash
from humanconnect.locks import SessionLock
from humanconnect.request import Flow, Job
from humanconnect.runtime import Runtime
from humanconnect.states import RequestState
from humanconnect.storage.models import OutboxEvent, SessionRecord
from humanconnect.storage.tokens import sealed_public_token
from humanconnect.upstream.breaker import Breaker
from humanconnect.upstream.client import Tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Success:
    """A run whose tokens are stored: what its announcement needs."""

    job: Job
    tokens: Tokens
    #: None when an earlier attempt's commit had landed (its event is in the outbox).
    event: OutboxEvent | None
    lock: SessionLock
    timings: list[float]


class Announcer:
    """One per exchanger: its Redis and database, and the batch of events marked sent."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.settings = rt.settings
        self.sent = events.SentMarks(rt.db)

    def success(
        self,
        job: Job,
        tokens: Tokens,
        event: OutboxEvent | None,
        lock: SessionLock,
        timings: list[float],
    ) -> None:
        """The event, the counters, the request's status and the lock's release in one
        Redis round trip, then the event marked sent (in a batch, within half a second). If
        Redis fails here the outbox sweep sends the event and the task's retry finds the
        session done and writes the status_records."""
        self.successes([Success(job, tokens, event, lock, timings)])

    def successes(self, done: list[Success]) -> None:
        """`success` for several sessions in one round trip (a batch's); on a Redis error
        every lock is held again and the error raised."""
        # No MULTI: each command stands alone, and a transaction costs two more replies.
        pipe = self.rt.redis.pipeline(transaction=False)
        releases: list[tuple[int, bytes]] = []
        replicas = self.settings.redis_min_replicas
        try:
            for one in done:
                self._queue_success(pipe, one)
                token = one.lock.queue_release(pipe)
                releases.append((len(pipe.command_stack) - 1, token))
            Breaker.queue_success(pipe)
            if replicas:
                # The event counts as sent once the replicas hold it: a failover right after
                # must not take it away. Fewer in time, the sweep sends it again (same
                # eventId).
                pipe.execute_command("WAIT", *self.settings.replica_wait)
            replies = pipe.execute()
        except Exception:
            # Every lock whose release was queued is held again, for its run to let go.
            for one, (_, token) in zip(done, releases, strict=False):
                one.lock.restore(token)
            raise
        held = replies[-1] >= replicas if replicas else True
        for one, (at, _) in zip(done, releases, strict=True):
            if not replies[at]:
                log.warning("session lock expired before release request=%s", one.job.request_id)
        sent = [one.event.id for one in done if one.event is not None]
        if held and sent:
            self.sent.add(sent)

    def _queue_success(self, pipe: redis.client.Pipeline, one: Success) -> None:
        job, tokens = one.job, one.tokens
        fields = {"clientUserId": tokens.client_user_id, "humanId": tokens.human_id}
        if tokens.public_token:
            fields["publicToken"] = self.rt.cipher.seal(tokens.public_token)
        metrics.queue_observe(pipe, "upstream_seconds", one.timings, endpoint="tokens")
        if one.event is not None:  # else the landed attempt's event is in the outbox, for the sweep
            events.queue_xadd(pipe, self.settings.events_stream, [one.event])
            metrics.queue_inc(pipe, "events", 1)
        metrics.queue_inc(pipe, "exchanges", outcome=RequestState.SUCCEEDED)
        claim, release = claim_of(job)
        status_records.queue_outcome(
            pipe,
            self.settings,
            claim,
            job.request_id,
            RequestState.SUCCEEDED,
            release=release,
            **fields,
        )
        if job.flow is Flow.ACCESS:
            # Stored now: the next Connect opens with an `id` token, not a kept `session` one.
            pipe.delete(redis_keys.connect_token(tokens.client_user_id))

    def mirror_final(self, job: Job, row: SessionRecord) -> None:
        """A duplicate delivery: copy the recorded outcome to this request's status_records."""
        fields: dict[str, str] = {"humanId": row.human_id}
        if row.state == RequestState.SUCCEEDED and row.client_user_id:
            fields["clientUserId"] = row.client_user_id
            with self.rt.db() as db:
                sealed = sealed_public_token(db, row.human_id)
            if sealed:
                fields["publicToken"] = sealed
        if row.state == RequestState.FAILED and row.error:
            fields["error"] = row.error
        self.status(job, RequestState(row.state), **fields)

    def status(self, job: Job, state: RequestState, **fields: str) -> None:
        fields.setdefault("humanId", job.human_id)
        pipe = self.rt.redis.pipeline(transaction=False)
        claim, release = claim_of(job)
        status_records.queue_outcome(
            pipe, self.settings, claim, job.request_id, state, release=release, **fields
        )
        pipe.execute()

    def release_access_claim(self, job: Job) -> None:
        if job.flow is Flow.ACCESS:
            release_access_claim(self.rt.redis, job.expected_client_user_id or "", job.request_id)


def release_access_claim(r: redis.Redis, client_user_id: str, request_id: str) -> None:
    """Let go of an access finish's claim (one per user) if it is still `request_id`'s."""
    pipe = r.pipeline(transaction=False)
    status_records.queue_release_claim(pipe, redis_keys.access_claim(client_user_id), request_id)
    pipe.execute()


def claim_of(job: Job) -> tuple[str, bool]:
    """The claim a finish was accepted under, and whether its end releases it: a session's
    is marked with how it ended (a duplicate of the token is answered from it); an access
    finish's, one per user, is marked and kept a minute more (a resend after a `503` is still
    this finish), then let go, so the user's next finish fetches again."""
    if job.flow is Flow.ACCESS:
        return redis_keys.access_claim(job.expected_client_user_id or ""), True
    return redis_keys.session_claim(session_hash(job.session_token)), False


def failed_fields(job: Job, reason: str) -> dict[str, str]:
    """A connect.failed event's fields; with a ticket, the user it vouched for."""
    fields = {"humanId": job.human_id, "requestId": job.request_id, "error": reason}
    if job.expected_client_user_id is not None:
        fields["clientUserId"] = job.expected_client_user_id
    return fields
