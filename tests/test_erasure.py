"""Erasure at the core, on a real Redis and both databases: what `erase` takes and leaves,
the marks a finish in flight is checked against, and the command line. (The whole
deployment, with finishes in flight, is tests/chaos/test_erasure.py.)"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest
import redis
from sqlalchemy import select

from humanconnect import erasure, events, status_records
from humanconnect.clock import now_us
from humanconnect.request import Job
from humanconnect.runtime import Runtime
from humanconnect.settings import Settings
from humanconnect.states import ErrorKind, RequestState
from humanconnect.storage import sessions
from humanconnect.storage.models import Erasure, OutboxEvent, SessionRecord, User
from tests import factories
from tests.support.env import BIN, FERNET_KEY, ROOT, service_env

USER = "user@example.com"
HUMAN = "a" * 24


@pytest.fixture
def rt(make_settings: Callable[..., Settings], db_url: str) -> Runtime:
    return Runtime(make_settings(DATABASE_URL=db_url))


def _session(
    rt: Runtime, human: str, *, expected: str | None = None, kind: str | None = None
) -> Job:
    """A failed session row of `human` (vouched for `expected`), and its status record."""
    job = factories.job(human_id=human, expected_client_user_id=expected)
    with rt.db() as db:
        row, _ = sessions.load_or_create(
            db,
            key=job.request_id + "-hash",
            request_id=job.request_id,
            human_id=human,
            received_us=job.received_us,
            sealed_session_token=rt.cipher.seal(job.session_token),
            expected_client_user_id=expected,
        )
        db.commit()
        if kind:
            row = sessions.locked(db, job.request_id + "-hash")
            sessions.mark_failed(row, "refused", ErrorKind(kind))
            db.commit()
    status_records.set_state(rt.redis, job.request_id, RequestState.FAILED, 60, humanId=human)
    return job


def test_an_unknown_user_is_none_and_nothing_is_written(rt: Runtime) -> None:
    assert erasure.erase(rt, "nobody@example.com") is None
    with rt.db() as db:
        assert db.scalars(select(Erasure)).all() == []
        assert db.scalars(select(OutboxEvent)).all() == []


def test_a_mark_is_found_among_any_number_of_ids(rt: Runtime) -> None:
    """`marked` names a fixed number of marks per query: a mark past the first query's, a
    repeated id and an absent one change nothing of the answer."""
    factories.stored_user(rt)
    received = _session(rt, HUMAN, expected=USER, kind="permanent").received_us
    assert erasure.erase(rt, USER) is not None
    others = [f"{i}" * 24 for i in range(1, 9)]
    with rt.db() as db:
        assert not erasure.marked(db, [], received)
        assert not erasure.marked(db, [None, None], received)
        assert not erasure.marked(db, others, received)
        assert erasure.marked(db, [*others, USER], received)  # past the first query's marks
        assert erasure.marked(db, [USER, USER, None], received)
        assert erasure.marked(db, [*others[:3], None, HUMAN], received)


def test_erase_takes_their_rows_events_and_records_and_leaves_a_mark(rt: Runtime) -> None:
    factories.stored_user(rt)
    mine = _session(rt, HUMAN, expected=USER, kind="permanent")
    # A ticket of theirs whose upstream named someone else: the row goes, that person stays
    forged = _session(rt, "b" * 24, expected=USER, kind=ErrorKind.CLIENT_USER_MISMATCH)
    other = _session(rt, "c" * 24)
    with rt.db() as db:
        events.record(db, "connect.completed", humanId=HUMAN, clientUserId=USER, requestId="r")
        events.record(db, "connect.failed", humanId="c" * 24, requestId="r2", error="x")
        db.commit()

    erased = erasure.erase(rt, USER)

    assert erased is not None
    assert (erased.tokens, erased.sessions, erased.events) == (1, 2, 1)
    assert erased.human_ids == {HUMAN}
    with rt.db() as db:
        assert db.scalars(select(User)).all() == []
        left = [r.request_id for r in db.scalars(select(SessionRecord))]
        assert left == [other.request_id]
        kinds = [json.loads(e.fields)["type"] for e in db.scalars(select(OutboxEvent))]
        assert sorted(kinds) == ["connect.failed", "user.erased"]
        # Marks by digest: received before now, their ids are erased; someone else's is not
        later = now_us() + 10_000_000
        assert erasure.marked(db, [USER], mine.received_us)
        assert erasure.marked(db, [None, HUMAN], mine.received_us)
        assert not erasure.marked(db, ["b" * 24], forged.received_us)
        assert not erasure.marked(db, [USER, HUMAN], later)  # a new sign-up is theirs again
        marks = [m.mark for m in db.scalars(select(Erasure))]
        assert USER not in marks and HUMAN not in marks
    r = rt.redis
    assert not r.exists(f"hc:request:{mine.request_id}")
    assert not r.exists(f"hc:request:{forged.request_id}")
    assert r.exists(f"hc:request:{other.request_id}")


def test_a_queued_finish_only_redis_knows_is_told_it_ended(rt: Runtime) -> None:
    """A finish accepted but not yet seen by a worker: its record names the humanId; after
    the erasure it says `failed` and names nobody."""
    factories.stored_user(rt)
    r = rt.redis
    r.hset("hc:request:queued1", mapping={"state": "queued", "humanId": HUMAN, "x": "y"})
    r.set("hc:session:h1", status_records.claim_value("queued1", HUMAN))
    r.set("hc:session:h2", status_records.claim_value("another", "d" * 24))
    # A claim in the form written before claims were compact
    r.set("hc:session:h3", json.dumps({"requestId": "older", "humanId": HUMAN}))

    erasure.erase(rt, USER)

    record = status_records.get_state(r, "queued1")
    assert record is not None and record.pop("updatedAt")
    assert record == {"state": "failed", "error": erasure.ERASED_ERROR}
    assert not r.exists("hc:session:h1") and not r.exists("hc:session:h3")
    assert r.exists("hc:session:h2")


def test_the_command_erases_then_finds_nobody_and_refuses_a_malformed_id(
    rt: Runtime, db_url: str, redis_url: str
) -> None:
    factories.stored_user(rt)
    env = service_env(
        DATABASE_URL=db_url, REDIS_URL=redis_url, HUMANCONNECT_ENCRYPTION_KEYS=FERNET_KEY
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "humanconnect"), "users", "erase", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = run(USER)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("erased: 1 tokens row")
    second = run(USER)
    assert second.returncode == 1 and "unknown user" in second.stderr
    bad = run("a\x01b")
    assert bad.returncode == 2 and "CLIENT_USER_ID" in bad.stderr


def test_redis_away_leaves_the_user_in_place_to_erase_again(
    rt: Runtime, make_settings: Callable[..., Settings], db_url: str
) -> None:
    factories.stored_user(rt)
    gone = Runtime(make_settings(DATABASE_URL=db_url, REDIS_URL="redis://127.0.0.1:1/0"))
    with pytest.raises(redis.exceptions.ConnectionError):
        erasure.erase(gone, USER)
    with rt.db() as db:
        assert db.scalars(select(User.client_user_id)).all() == [USER]
    assert erasure.erase(rt, USER) is not None
