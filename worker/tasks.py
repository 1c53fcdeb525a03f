"""Celery tasks: thin verbs that load what they need and call humanconnect.exchange."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache, lru_cache
from typing import Any

import redis
from celery import Task, signals
from celery.concurrency.thread import TaskPool as ThreadPool
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from humanconnect import events, logs, metrics, redis_clients, status_records, tracing
from humanconnect.announce import release_access_claim
from humanconnect.crypto import DecryptError
from humanconnect.exchange import Exchanger, Outcome
from humanconnect.exchange_batch import Batch, Item, run_in
from humanconnect.jobs.reconcile import requeue_stale
from humanconnect.jobs.repair import Repairer
from humanconnect.jobs.retention import purge
from humanconnect.locks import held_or_skip
from humanconnect.minting import Minter, MintKind
from humanconnect.queue import (
    DELIVER_TASK,
    EXCHANGE_TASK,
    MINT_TASK,
    RECONCILE_TASK,
    RELAY_TASK,
    REPAIR_TASK,
    RETENTION_TASK,
)
from humanconnect.redis_keys import QUEUE, QUEUES, RELAY_LOCK, WAITING_QUEUE
from humanconnect.request import ExchangeRequest, Job
from humanconnect.runtime import Runtime
from humanconnect.settings import get_settings
from humanconnect.startup import ready_settings_or_exit
from humanconnect.states import RequestState
from humanconnect.storage import migrate
from humanconnect.upstream.limiter import GlobalRateLimiter
from humanconnect.upstream.retry import backoff
from humanconnect.webhooks.deliveries import endpoint_digest
from humanconnect.webhooks.dispatch import Dispatcher
from humanconnect.webhooks.sender import Sender
from humanconnect.webhooks.signing import Signer
from worker import priority, warm
from worker.batch import Delivery, ExchangeTask
from worker.celery import app, send_exchange

log = logging.getLogger(__name__)
# How often an unforeseen exception (a bug) is retried before the session is failed.
UNEXPECTED_RETRIES = 5
# A batch's message that met a fault of the batch's own runs alone after this long: never a
# loop of the same message through the same fault.
UNEXPECTED_PAUSE_S = 2.0
# Our own Redis or database at fault, not the session: retried for as long as it takes.
INFRASTRUCTURE_ERRORS = (
    OperationalError,
    PoolTimeout,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    return Runtime(get_settings())


@lru_cache(maxsize=1)
def limiter() -> GlobalRateLimiter:
    """The process's handle on the global upstream limit (shared by exchanges and repairs)."""
    settings = runtime().settings
    return GlobalRateLimiter(redis_clients.client(settings), settings.max_rps)


@lru_cache(maxsize=1)
def exchanger() -> Exchanger:
    return Exchanger(runtime(), limiter().acquire)


#: The worker's threads once it is ready (`--concurrency` overrides the setting).
_threads: list[int] = []


@lru_cache(maxsize=1)
def calls() -> ThreadPoolExecutor:
    """Where a batch's upstream calls run side by side: as many as the worker has threads."""
    size = _threads[-1] if _threads else runtime().settings.worker_concurrency
    return ThreadPoolExecutor(size, thread_name_prefix="exchange-call")


def run_batch(deliveries: list[Delivery]) -> list[str]:
    """Run a batch of exchange messages together (humanconnect/exchange_batch.py); the ids
    of those whose delivery ended or whose next try was sent (worker/batch.py acks them and
    puts the rest back in the queue). With tracing on, each session's own steps are a span
    in its finish's trace, as a try alone is."""
    try:
        return _run_batch(deliveries)
    except Exception:  # a fault of the batch's own: each message runs alone, a little later
        log.exception("a batch of %d sessions failed; each runs alone", len(deliveries))
        return [d.id for d in deliveries if _send_alone(d, d.retries, UNEXPECTED_PAUSE_S)]


def _run_batch(deliveries: list[Delivery]) -> list[str]:
    rt = runtime()
    settled: list[str] = []
    items: list[tuple[Delivery, Item, Callable[[], None]]] = []
    for delivery in deliveries:
        request = delivery.request
        member = tracing.member(
            delivery.trace_headers, f"run/{EXCHANGE_TASK}", request.request_id, len(deliveries)
        )
        context, end = member if member is not None else (contextvars.copy_context(), _nothing)
        # Its log lines name its request, as a try alone does.
        context.run(logs.request_id.set, request.request_id)
        try:
            waiting = delivery.routing_key == WAITING_QUEUE
            job = run_in(context, opened, rt, request, waiting=waiting)
        except Exception:  # Redis away while recording its failure: it runs alone, later
            log.warning("could not open request=%s", request.request_id, exc_info=True)
            if _send_alone(delivery, delivery.retries, UNEXPECTED_PAUSE_S):
                settled.append(delivery.id)
            end()
            continue
        if job is None:
            settled.append(delivery.id)
            end()
            continue
        items.append((delivery, Item(job, delivery.retries, context=context), end))
    Batch(exchanger(), calls()).run([item for _, item, _ in items])
    for delivery, item, end in items:
        if item.within(_settle, delivery, item):
            settled.append(delivery.id)
        end()
    log.info(
        "ran %d sessions together: %d ended or sent round again, %d back to the queue",
        len(deliveries),
        len(settled),
        len(deliveries) - len(settled),
    )
    return settled


def _nothing() -> None:
    pass


def _settle(delivery: Delivery, item: Item) -> bool:
    """End a batch's delivery, or send its next try (to run alone, with Celery's own
    countdown); False when neither could be done (it goes back to the queue)."""
    try:
        pause = next_try(runtime(), item.job, item.retries, item.outcome, item.error)
    except Exception:
        log.warning("could not end request=%s", item.job.request_id, exc_info=True)
        return _send_alone(delivery, item.retries, UNEXPECTED_PAUSE_S)
    return pause is None or _send_alone(delivery, item.retries + 1, pause)


def _send_alone(delivery: Delivery, retries: int, countdown: float) -> bool:
    """Send a batch's message again to run alone after `countdown` (Celery's own path,
    `retries` its count of tries); False when it could not be sent (Redis away: it goes
    back to the queue)."""
    try:
        exchange_session.apply_async(
            kwargs=delivery.kwargs,
            task_id=delivery.id,
            retries=retries,
            countdown=countdown,
            queue=QUEUE,
            routing_key=QUEUE,
        )
    except Exception:
        log.warning("could not send request=%s", delivery.request.request_id, exc_info=True)
        return False
    return True


@app.task(
    bind=True,
    base=ExchangeTask,
    name=EXCHANGE_TASK,
    max_retries=None,
    run_batch=staticmethod(run_batch),
)
def exchange_session(
    self: Task,
    request_id: str,
    human_id: str,
    client_id: str,
    sealed_session_token: str,
    received_us: int,
    window_start_us: int | None = None,
    expected_client_user_id: str | None = None,
    connected_sources: str = "",
) -> None:
    """Exchange one accepted session for tokens (or, for an access finish, fetch the user's
    access token), store them, or schedule the next try.

    The arguments are `ExchangeRequest.task_kwargs()` (humanconnect/request.py). With
    HUMANCONNECT_EXCHANGE_BATCH above 1 the consumer runs first tries in batches instead
    (worker/batch.py, `run_batch`); a next try always comes here."""
    request = ExchangeRequest(
        request_id=request_id,
        human_id=human_id,
        client_id=client_id,
        sealed_session_token=sealed_session_token,
        received_us=received_us,
        window_start_us=window_start_us,
        expected_client_user_id=expected_client_user_id,
        connected_sources=connected_sources,
    )
    _exchange_one(self, request)


def _exchange_one(self: Task, request: ExchangeRequest) -> None:
    with logs.request_context(request.request_id):
        tracing.tag(request.request_id)
        rt = runtime()
        # A person waits on a finish that came through the waiting queue (its retries don't).
        waiting = (self.request.delivery_info or {}).get("routing_key") == WAITING_QUEUE
        job = opened(rt, request, waiting=waiting)
        if job is None:
            return
        retries = self.request.retries or 0
        try:
            outcome, error = exchanger().run(job, retries=retries), None
        except Exception as exc:
            outcome, error = None, exc
        pause = next_try(rt, job, retries, outcome, error)
        if pause is not None:
            raise _retry(self, pause, error) from None


def opened(rt: Runtime, request: ExchangeRequest, *, waiting: bool) -> Job | None:
    """The request's job with its session token opened; None when it can't be, its failure
    recorded (retrying cannot help: the key that sealed it is gone from the configured keys)."""
    try:
        session_token = rt.cipher.open(request.sealed_session_token)
    except DecryptError:
        reason = "session token sealed with an encryption key that is no longer configured"
        log.error("cannot open session token request=%s", request.request_id)
        # The claim's full term, not a finished record's: no `sessions` row was written
        # and the claim can't be marked (its key needs the token), so this record is the
        # only place a duplicate of this session learns that it failed.
        status_records.set_state(
            rt.redis,
            request.request_id,
            RequestState.FAILED,
            rt.settings.status_ttl_s,
            humanId=request.human_id,
            error=reason,
        )
        if request.expected_client_user_id:  # an access finish's claim, if it is one: let go
            release_access_claim(rt.redis, request.expected_client_user_id, request.request_id)
        return None
    return Job.opened(request, session_token, waiting=waiting)


def minter() -> Minter:
    """The exchanger's: one guard and breaker handle per process for mints and fetches."""
    return exchanger().minter


@app.task(name=MINT_TASK, ignore_result=True)
def mint_token(mint_id: str, user: str, kind: str, email: str | None = None) -> str:
    """Mint a current-flow token for a person waiting on the web (humanconnect/minting.py).
    Never retried by Celery: the person has an answer within 10 s either way, and asking
    again starts a new mint."""
    with logs.request_context(mint_id):
        return minter().run(mint_id, user, MintKind(kind), email)


def next_try(
    rt: Runtime, job: Job, retries: int, outcome: Outcome | None, error: BaseException | None
) -> float | None:
    """Seconds until a delivery's next try, or None when it has ended: from its outcome, or
    from what it raised."""
    request_id = job.request_id
    if error is None:
        assert outcome is not None
        return outcome.retry_in
    if isinstance(error, INFRASTRUCTURE_ERRORS):
        # Our own infrastructure, not the session, is at fault: never fail the user for it.
        pause = backoff(
            retries, initial=1.0, cap=rt.settings.retry_max_countdown_s, retry_after=None
        )
        log.warning(
            "infrastructure error, retrying request=%s in=%.1fs error=%s: %s",
            request_id,
            pause,
            type(error).__name__,
            # The driver's own message ("database is locked"), never the statement or its
            # parameters, which SQLAlchemy's message carries.
            str(getattr(error, "orig", None) or error)[:200],
        )
        exchanger().note_outage(job, f"infrastructure error: {type(error).__name__}")
        return pause
    # Unforeseen: a few tries, then a recorded failure rather than a silent ack.
    if retries < UNEXPECTED_RETRIES:
        log.error("unexpected error, retrying request=%s", request_id, exc_info=error)
        return 2.0**retries
    log.error("unexpected error, giving up request=%s", request_id, exc_info=error)
    exchanger().fail_internal(job, f"internal error: {type(error).__name__}")
    return None


def _retry(self: Task, countdown: float, exc: BaseException | None = None) -> BaseException:
    """The retry to raise, on the ordinary queue whichever queue the try came from: the
    contract serves waiting finishes before retries, and a retry's countdown has mostly used
    up the person's wait anyway."""
    return self.retry(countdown=countdown, exc=exc, queue=QUEUE, routing_key=QUEUE)


@app.task(name=RELAY_TASK, ignore_result=True)
def relay_events() -> int:
    """Sweep committed events that their worker could not relay (Redis was away, it died)."""
    rt = runtime()
    sent = 0
    with held_or_skip(rt.redis, RELAY_LOCK, timeout=60) as lock:
        if lock is None:
            return 0
        with rt.db() as db:
            while batch := events.relay_pending(
                db, rt.redis, rt.settings.events_stream, wait=rt.settings.replica_wait
            ):
                sent += batch
                metrics.inc(rt.redis, "events", batch)
    if sent:
        log.info("relayed %d pending events", sent)
    return sent


@lru_cache(maxsize=1)
def webhook_sender() -> Sender:
    settings = runtime().settings
    return Sender(settings.webhook_timeout_s, pool_size=settings.webhook_concurrency)


@cache
def webhook_dispatcher(digest: str) -> Dispatcher | None:
    """The dispatcher of the endpoint named by `digest`, if this process has it configured."""
    rt = runtime()
    settings = rt.settings
    endpoint = next((u for u in settings.webhook_urls if endpoint_digest(u) == digest), None)
    if endpoint is None or settings.webhook_secret is None:
        return None
    return Dispatcher(
        rt,
        endpoint,
        webhook_sender(),
        Signer.from_secret(settings.webhook_secret.get_secret_value()),
        ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook"),
        settings.webhook_concurrency,
    )


@app.task(name=DELIVER_TASK, ignore_result=True)
def deliver_webhooks(digest: str) -> int:
    """Beat's tick for one endpoint: deliver what is due to it (skipped while another
    dispatcher of the endpoint runs)."""
    dispatcher = webhook_dispatcher(digest)
    if dispatcher is None:
        log.warning("webhook tick for an endpoint this worker does not have configured")
        return 0
    return dispatcher.run()["delivered"]


@app.task(name=REPAIR_TASK, ignore_result=True)
def repair_public_tokens() -> int:
    """The scheduled publicToken repair; skipped (and logged) while another run holds the lock."""
    rt = runtime()
    return Repairer(rt, limiter().acquire).run().repaired


@app.task(name=RETENTION_TASK, ignore_result=True)
def purge_expired() -> int:
    """Delete finished sessions, relayed events and settled deliveries past
    HUMANCONNECT_RETENTION_S; skipped while another run holds the lock."""
    report = purge(runtime())
    return report.sessions + report.deliveries + report.outbox


@app.task(name=RECONCILE_TASK, ignore_result=True)
def reconcile_pending() -> int:
    """Re-send accepted requests that made no progress (a message the broker lost)."""
    rt = runtime()
    return requeue_stale(
        rt.redis, send_exchange, stale_s=rt.settings.reconcile_after_s, queues=QUEUES
    )


@signals.worker_init.connect
def _on_worker_init(**_: Any) -> None:
    settings = ready_settings_or_exit(secret=True, at_once=True)
    tracing.install("worker", settings)
    priority.nice_session_group()
    if settings.auto_migrate:
        migrate.upgrade(settings.database_url)


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Warm up before there is anything to drain, not inside the first tasks of a burst."""
    controller = getattr(sender, "controller", None)
    pool = getattr(controller, "pool_cls", None)
    if not (isinstance(pool, type) and issubclass(pool, ThreadPool)):
        # Under prefork this runs in the parent, which runs no task: its connections would
        # only be held there, and inherited by every child forked later.
        return
    try:
        # A connection for each of the pool's threads (`--concurrency` overrides the setting).
        threads = getattr(controller, "concurrency", None) or 1
        warm.prepare(runtime(), threads)
        exchanger()
        limiter()
        _threads.append(threads)
        calls.cache_clear()  # a batch that ran before now sized it from the setting
        calls()
    except Exception:  # a warm-up never fails the worker: its tasks do what it could not
        log.warning("worker warm-up skipped", exc_info=True)


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    # Marks still batched would leave their events to the sweep, to be sent twice.
    if exchanger.cache_info().currsize:
        exchanger().announce.sent.flush()


@signals.beat_init.connect
def _on_beat_init(**_: Any) -> None:
    tracing.install("beat", ready_settings_or_exit(secret=False, at_once=True))


@signals.after_setup_logger.connect
def _on_setup_logger(**_: Any) -> None:
    settings = get_settings()
    secrets = [s.get_secret_value() for s in (settings.client_secret, settings.webhook_secret) if s]
    logs.install(secrets, as_json=settings.log_json)
    logs.quiet_celery()
