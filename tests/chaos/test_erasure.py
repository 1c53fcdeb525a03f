"""Erasing a user through a whole deployment (web, workers, beat, Redis, the database): a user
with a stored token, a failed session, undelivered webhooks, an exchange running (the
stand-in holds its call) and a finish still queued (the worker frozen) is erased with one
`DELETE /users/{clientUserId}`. Then neither the database nor Redis holds their clientUserId,
humanId, tokens or session tokens (but in the one `user.erased` event), the finishes in
flight end `failed` and store nothing, a second erase is 404, and another user's rows and
records are byte-identical."""

from __future__ import annotations

import json
import secrets
import signal
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import text

from humanconnect.erasure import ERASED_ERROR
from humanconnect.sandbox.standin import client_user_id_for
from humanconnect.storage.db import session_factory
from tests import factories
from tests.support.chaos import Chaos
from tests.support.env import HANG_GUARD, wait_for
from tests.support.hooks import chaos_hooked
from tests.support.receiver import Receiver
from tests.support.scan import redis_text

pytestmark = pytest.mark.slow

API_TOKEN = "erasure-test-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
TABLES = ("users", "sessions", "outbox", "webhook_deliveries", "erasures")


def _rows(chaos: Chaos, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with session_factory(chaos.db_url)() as db:
        return [tuple(r) for r in db.execute(text(sql), params).all()]


def _states(chaos: Chaos, human: str) -> list[str]:
    return sorted(
        r[0] for r in _rows(chaos, "SELECT state FROM sessions WHERE human_id = :h", h=human)
    )


def _naming(chaos: Chaos, who: set[str]) -> list[tuple[Any, ...]]:
    """The outbox rows whose event names one of `who` (as clientUserId or humanId)."""
    return [
        r
        for r in _rows(chaos, "SELECT * FROM outbox ORDER BY id")
        if {json.loads(r[2]).get("clientUserId"), json.loads(r[2]).get("humanId")} & who
    ]


def _snapshot(chaos: Chaos, human: str, request_id: str, session_hash: str) -> dict[str, Any]:
    """What the service keeps of one user, but their webhook deliveries (a receiver that
    is down has them retried, which changes them with or without an erasure)."""
    r = chaos.r
    return {
        "users": _rows(chaos, "SELECT * FROM users WHERE human_id = :h", h=human),
        "sessions": _rows(chaos, "SELECT * FROM sessions WHERE human_id = :h", h=human),
        "outbox": _naming(chaos, {human, client_user_id_for(human)}),
        "status": r.hgetall(f"hc:request:{request_id}"),
        "claim": r.get(f"hc:session:{session_hash}"),
    }


def _status(chaos: Chaos, request_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{chaos.url}/connect/finish/{request_id}", timeout=HANG_GUARD).json())


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_an_erased_user_leaves_nothing_and_nobody_else_changes(
    chaos: Chaos, receiver: Receiver
) -> None:
    standin = chaos.standin.state
    standin.faults.refuse_token_prefix = "junk-"
    standin.faults.hold_token_prefix = "hold-"
    standin.faults.hang_s = 300
    receiver.status = 500  # every webhook stays undelivered for now
    chaos_hooked(chaos, receiver, HUMANCONNECT_API_TOKEN=API_TOKEN)
    human, other = factories.human_id(), factories.human_id()
    user = client_user_id_for(human)
    # Given a stored token and a failed session of theirs, and another user's stored token
    stored = factories.finish_body(humanId=human)
    failed = factories.finish_body(humanId=human, sessionToken="junk-" + secrets.token_hex(8))
    theirs = factories.finish_body(humanId=other)
    sent = chaos.send([stored, failed, theirs])
    assert {s.status for s in sent} == {202}
    wait_for(lambda: _states(chaos, human) == ["failed", "succeeded"], 60, what="settled")
    wait_for(lambda: _states(chaos, other) == ["succeeded"], 60, what="the other settled")
    # ... their events relayed (the other user's will not change any more)
    wait_for(
        lambda: all(r[4] is not None for r in _naming(chaos, {human, other})),
        60,
        what="the events relayed",
    )
    (request_b, hash_b) = _rows(
        chaos, "SELECT request_id, session_hash FROM sessions WHERE human_id = :h", h=other
    )[0]
    before = _snapshot(chaos, other, request_b, hash_b)
    assert before["users"] and before["status"] and before["claim"] and before["outbox"]
    # ... an exchange of theirs running (the upstream holds the call)
    held = factories.finish_body(humanId=human, sessionToken="hold-" + secrets.token_hex(8))
    (held_sent,) = chaos.send([held])
    wait_for(lambda: standin.calls["tokens:held"] >= 1, 60, what="the call held upstream")
    # ... and a finish of theirs queued while the workers are frozen
    for worker in chaos.workers:
        worker.signal(signal.SIGSTOP)
    queued = factories.finish_body(humanId=human)
    (queued_sent,) = chaos.send([queued])
    assert {held_sent.status, queued_sent.status} == {202}
    request_ids = {
        b["sessionToken"]: httpx.post(
            f"{chaos.url}/connect/finish", json=b, timeout=HANG_GUARD
        ).json()["requestId"]
        for b in (held, queued)
    }  # a resend answers with its requestId

    # When the user is erased
    erased = httpx.delete(f"{chaos.url}/users/{quote(user)}", headers=AUTH, timeout=HANG_GUARD)
    for worker in chaos.workers:
        worker.signal(signal.SIGCONT)
    standin.release.set()

    # Then 204, and the finishes in flight end failed, saying why and naming nobody
    assert erased.status_code == 204, erased.text
    for request_id in request_ids.values():

        def ended(rid: str = request_id) -> bool:
            return _status(chaos, rid)["status"] == "failed"

        wait_for(ended, 60, what="the finish in flight to end")
        status = _status(chaos, request_id)
        assert status["error"] == ERASED_ERROR and status.get("humanId") is None
    # And the held call's tokens, issued upstream after the erasure, were stored nowhere
    assert held["sessionToken"] in standin.by_session
    # And a second erase finds nobody
    again = httpx.delete(f"{chaos.url}/users/{quote(user)}", headers=AUTH, timeout=HANG_GUARD)
    assert again.status_code == 404
    # And one user.erased event, on the stream and delivered as a webhook once it can be
    erasures = [e for e in _naming(chaos, {human, user})]
    assert [json.loads(e[2])["type"] for e in erasures] == ["user.erased"]
    event = json.loads(erasures[0][2])
    assert (event["clientUserId"], event["humanId"]) == (user, human)
    receiver.status = 200
    wait_for(
        lambda: event["eventId"] in receiver.delivered_ids(), 60, what="the user.erased webhook"
    )
    # And nothing else names them: the database (but that event's row) and Redis (but that
    # event's stream entry)
    needles = {user, human} | {b["sessionToken"] for b in (stored, failed, held, queued)}
    for token in (stored["sessionToken"], held["sessionToken"]):
        issued = standin.by_session[token]
        needles |= {issued.access_token, issued.public_token}
    stream = cast(list[tuple[bytes, dict[bytes, bytes]]], chaos.r.xrange("humanconnect:events"))
    entries = [
        entry_id for entry_id, fields in stream if fields[b"eventId"] == event["eventId"].encode()
    ]
    assert len(entries) == 1
    chaos.r.xdel("humanconnect:events", *entries)
    redis = redis_text(chaos.r)
    database = "\n".join(
        str(row)
        for table in TABLES
        for row in _rows(chaos, f"SELECT * FROM {table}")
        if not (table == "outbox" and row[1] == event["eventId"])
    )
    for needle in needles:
        assert needle.encode() not in redis, "Redis still names the erased user"
        assert needle not in database, "the database still names the erased user"
    # And the other user's rows and records are byte-identical
    assert _snapshot(chaos, other, request_b, hash_b) == before
