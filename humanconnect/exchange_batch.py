"""Several sessions run together: the worker's batch (worker/batch.py) hands them here.

What a run pays once however many sessions it carries is shared: the locks are taken in one
Redis round trip, the records begun in one transaction, the tokens stored in another (a
savepoint each), the successes announced in one round trip. The upstream calls run side by
side on the caller's executor. Everything else, from a refusal to an erased user to a
transaction that failed, goes on down the single run's own steps (humanconnect/exchange.py),
so each session ends as it would have alone; only its Celery outcome is left to the caller
(`Item.outcome`, or `Item.error` for what the single task would have raised).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import redis
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from humanconnect import erasure
from humanconnect.announce import Success
from humanconnect.errors import PermanentUpstreamError, UpstreamError
from humanconnect.exchange import BUSY_COUNTDOWN_S, Exchanger, Outcome, _Attempt
from humanconnect.request import Flow, Job
from humanconnect.storage import sessions
from humanconnect.storage.models import OutboxEvent, SessionRecord
from humanconnect.upstream.client import Tokens

log = logging.getLogger(__name__)
T = TypeVar("T")

# The first transaction lost with its connection: every run's error, not one session's.
_DATABASE_DOWN = (OperationalError, PoolTimeout)
# A record gone from under a run: its user's erasure, as `Exchanger.holding` tells.
_ERASED = (erasure.ErasedMeanwhile, sessions.MissingSession)


class _Landed(Exception):
    """An earlier attempt's store had committed: this one's savepoint is rolled back."""


@dataclass
class Item:
    """One session of a batch and how its delivery ended."""

    job: Job
    #: Tries so far (the message's `retries`).
    retries: int = 0
    outcome: Outcome | None = None
    #: What the single task would have raised (its caller maps it to a retry).
    error: BaseException | None = None
    #: Where the session's own steps run: its request id for log lines, and with tracing on
    #: its span current.
    context: contextvars.Context | None = None

    def within(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` in the item's context (as is, without one)."""
        return run_in(self.context, fn, *args, **kwargs)


def run_in(
    context: contextvars.Context | None, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """`fn` in `context`, or as is when there is none."""
    if context is None:
        return fn(*args, **kwargs)
    return context.run(fn, *args, **kwargs)


@dataclass(eq=False)
class _Run:
    item: Item
    at: _Attempt
    tokens: Tokens | None = None
    stored: tuple[bool, OutboxEvent | None] | None = None


class Batch:
    """Runs a list of items through one exchanger, sharing what can be shared."""

    def __init__(self, exchanger: Exchanger, calls: Executor):
        self.ex = exchanger
        self.rt = exchanger.rt
        self.calls = calls

    def run(self, items: list[Item]) -> None:
        """End every item's delivery: each gets an outcome or an error."""
        runs: list[_Run] = []
        alone: list[tuple[Item, Future[Outcome]]] = []
        keys: set[str] = set()
        for item in items:
            at = self.ex.attempt(item.job)
            # An access finish, or the same session twice in one batch: its own run.
            if item.job.flow is Flow.TOKENS and at.key not in keys:
                keys.add(at.key)
                runs.append(_Run(item, at))
            else:
                run_alone = partial(item.within, self.ex.run, item.job, retries=item.retries)
                try:
                    alone.append((item, self.calls.submit(run_alone)))
                except RuntimeError as exc:  # the pool shut down with the worker
                    item.error = exc
        try:
            self._announce(self._store(self._call(self._begin(self._lock(runs)))))
        except Exception as exc:  # a fault of the batch's own: whatever it left unended
            log.exception("a batch failed")
            for run in runs:
                if run.item.outcome is None and run.item.error is None:
                    run.item.error = exc
        for run in runs:
            # Let go of what the success's round trip did not release; a release that
            # fails is the run's error, as alone.
            _settle_release(run)
        for item, future in alone:
            _settle(item, future.result)

    # -- shared steps --------------------------------------------------------------------
    def _lock(self, runs: list[_Run]) -> list[_Run]:
        """Every lock taken (and its request marked running) in one round trip; the runs
        that hold theirs. Another delivery's lock: busy, as alone."""
        if not runs:
            return []
        pipe = self.rt.redis.pipeline(transaction=False)
        ttl = self.rt.settings.status_ttl_s
        tokens = [
            r.at.lock.queue_take(pipe, r.item.job.request_id, r.item.job.human_id, ttl)
            for r in runs
        ]
        try:
            # Each reply its own: a script that failed for one session took no lock, and
            # every other lock the round trip took is held (and let go) as usual.
            replies = pipe.execute(raise_on_error=False)
        except redis.exceptions.RedisError as exc:
            for run in runs:
                run.item.error = exc
            return []
        held = []
        for run, token, got in zip(runs, tokens, replies, strict=True):
            if isinstance(got, Exception):
                run.item.error = got
            elif run.at.lock.took(token, got):
                held.append(run)
            else:
                run.item.outcome = Outcome("busy", retry_in=BUSY_COUNTDOWN_S)
        return held

    def _begin(self, runs: list[_Run]) -> list[_Run]:
        """Every record made or read and its attempt begun, in one transaction; the runs
        that go on to call. A record already final, or a user erased, ends its run as
        alone."""
        if not runs:
            return []
        begun: list[_Run] = []
        ended: list[tuple[_Run, Callable[[], Outcome]]] = []
        try:
            with self.rt.db() as db:
                for run in runs:
                    try:
                        with db.begin_nested():
                            state = run.item.within(self.ex.begin_in, db, run.at)
                            if isinstance(state, Outcome):  # pragma: no cover - access only
                                raise RuntimeError("a batch runs no access finish")
                    except _ERASED as exc:
                        ended.append((run, partial(_raise, exc)))
                        continue
                    except _DATABASE_DOWN:
                        raise  # the transaction is gone: every run's error
                    except Exception as exc:  # this session's own: its savepoint undone
                        ended.append((run, partial(_raise, exc)))
                        continue
                    if isinstance(state, SessionRecord):
                        ended.append((run, partial(self.ex.mirror, run.at, state)))
                    else:
                        begun.append(run)
                db.commit()
        except Exception as exc:  # the transaction failed: each run as it would have alone
            for run in runs:
                self._alone(run, partial(_raise, exc))
            return []
        for run, end in ended:
            self._alone(run, end)
        return begun

    def _call(self, runs: list[_Run]) -> list[_Run]:
        """The upstream calls side by side; the runs answered with tokens to keep."""
        futures = [(run, self._submit(run, self.ex.call, run.at)) for run in runs]
        answered = []
        for run, future in futures:
            if future is None:
                continue
            try:
                run.tokens = future.result()
            except UpstreamError as exc:
                self._alone(run, partial(self.ex.after_refusal, run.at, exc, run.item.retries))
                continue
            except Exception as exc:
                self._alone(run, partial(_raise, exc))
                continue
            if self.ex.mismatched(run.at, run.tokens):
                self._alone(run, partial(self.ex.fail_mismatch, run.at))
            else:
                answered.append(run)
        return answered

    def _store(self, runs: list[_Run]) -> list[_Run]:
        """Every answer stored in one transaction, a savepoint each; the runs stored. If
        that transaction fails, each run stores on its own, side by side, riding out the
        outage as a lone run does (an earlier commit that landed is found so)."""
        if not runs:
            return []
        # PostgreSQL's per-user store locks taken in one order: two batches never deadlock.
        runs = sorted(runs, key=lambda r: _tokens(r).client_user_id)
        # As alone, a full term before the store: a run answered early has waited for the
        # batch's slowest call since.
        for run in runs:
            run.at.lock.renew_if_reachable()
        results: dict[_Run, object] = {}
        try:
            with self.rt.db() as db:
                for run in runs:
                    try:
                        with db.begin_nested():
                            stored = run.item.within(self.ex.store_in, db, run.at, _tokens(run))
                            if stored is None:
                                raise _Landed
                    except _Landed:
                        results[run] = (False, None)
                    except (PermanentUpstreamError, *_ERASED) as exc:
                        results[run] = exc
                    else:
                        results[run] = stored
                db.commit()
        except Exception as exc:
            log.warning(
                "a batch's store failed, storing its %d sessions one by one: %s",
                len(runs),
                type(exc).__name__,
            )
            alone = [(run, self._submit(run, self.ex.store, run.at, _tokens(run))) for run in runs]
            results = {}
            for run, future in alone:
                if future is None:
                    # Not even submitted (the worker is stopping): stored here instead.
                    future = _done(partial(run.item.within, self.ex.store, run.at, _tokens(run)))
                try:
                    results[run] = future.result()
                except Exception as err:
                    results[run] = err
        stored_runs = []
        for run in runs:
            result = results[run]
            if isinstance(result, PermanentUpstreamError):
                self._alone(run, partial(self.ex.store_refused, run.at, result))
            elif isinstance(result, BaseException):
                self._alone(run, partial(_raise, result))
            else:
                run.stored = result  # type: ignore[assignment]
                stored_runs.append(run)
        return stored_runs

    def _announce(self, runs: list[_Run]) -> None:
        """Every success told in one round trip (a Redis error: each run's, as alone)."""
        if not runs:
            return
        done = []
        for run in runs:
            assert run.tokens is not None and run.stored is not None
            done.append(
                Success(run.item.job, run.tokens, run.stored[1], run.at.lock, run.at.timings)
            )
        try:
            self.ex.announce.successes(done)
        except Exception as exc:
            for run in runs:
                run.item.error = exc
            return
        for run in runs:
            assert run.stored is not None
            run.item.outcome = run.item.within(self.ex.succeeded, run.at, run.stored[0])

    def _submit(self, run: _Run, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        """`fn(*args)` on the calls' pool in the run's context; None when the pool refused
        it (shut down with the worker), the run then ended with that error."""
        try:
            return self.calls.submit(run.item.within, fn, *args)
        except RuntimeError as exc:
            self._alone(run, partial(_raise, exc))
            return None

    # -- a run's own end -----------------------------------------------------------------
    def _alone(self, run: _Run, step: Callable[[], Outcome]) -> None:
        """The rest of `run` down the single run's path (the lock let go after)."""
        _settle(run.item, partial(run.item.within, self.ex.holding, run.at, step))


def _done(fn: Callable[[], Any]) -> Future[Any]:
    """A future holding what `fn` returned or raised, run here."""
    future: Future[Any] = Future()
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)
    return future


def _raise(exc: BaseException) -> Outcome:
    raise exc


def _settle(item: Item, step: Callable[[], Outcome]) -> None:
    try:
        item.outcome = step()
    except Exception as exc:
        item.error = exc


def _settle_release(run: _Run) -> None:
    try:
        run.at.lock.release_quietly(run.item.job.request_id)
    except Exception as exc:
        run.item.outcome, run.item.error = None, exc


def _tokens(run: _Run) -> Tokens:
    assert run.tokens is not None, "only an answered run is stored"
    return run.tokens
