"""Webhooks through a whole deployment (web, workers, beat, own Redis with AOF) and a real
receiver on a port: every event on the stream reaches the receiver, signed, through a flaky
receiver, a receiver that is down, a worker SIGKILLed and Redis SIGKILLed mid-delivery."""

from __future__ import annotations

import signal
import time
from collections import Counter

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from humanconnect.webhooks.signing import new_secret
from tests.support.chaos import Chaos, bodies
from tests.support.env import CLIENT_SECRET, wait_for
from tests.support.figures import record
from tests.support.hooks import CHAOS_SECRET, chaos_hooked, event_ids, wait_all_delivered
from tests.support.receiver import Receiver
from tests.support.scan import assert_no_secrets

pytestmark = pytest.mark.slow


def verify_deliveries(
    chaos: Chaos, receiver: Receiver, sent: list[dict[str, str]]
) -> dict[str, object]:
    """Same ids as the stream; each body is its event and verifies; another secret fails."""
    stream = event_ids(chaos)
    assert receiver.delivered_ids() == stream.keys()
    other = Webhook(new_secret())
    for got in receiver.received:
        payload = Webhook(CHAOS_SECRET).verify(got.body, got.headers)
        event = stream[got.headers["webhook-id"]]
        assert payload == {
            "type": event["type"],
            "timestamp": event["occurredAt"],
            "data": {k: v for k, v in event.items() if k not in ("type", "occurredAt")},
        }
        with pytest.raises(WebhookVerificationError):
            other.verify(got.body, got.headers)
    # A body carries what its event carries: no token, session token or secret.
    issued = chaos.standin.state.by_human.values()
    needles = [CHAOS_SECRET, CLIENT_SECRET, *(i.access_token for i in issued)]
    needles += [i.public_token for i in issued if i.public_token]
    needles += [b["sessionToken"] for b in sent]
    assert_no_secrets(
        needles,
        texts={"webhook requests": "\n".join(f"{r.headers}{r.body}" for r in receiver.received)},
    )
    per_id = Counter(got.headers["webhook-id"] for got in receiver.received)
    return {
        "events": len(stream),
        "requests": len(receiver.received),
        "answered_2xx": sum(1 for r in receiver.received if 200 <= r.status < 300),
        "most_requests_for_one_event": max(per_id.values()),
    }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_event_reaches_a_flaky_receiver_that_goes_down(
    chaos: Chaos, receiver: Receiver
) -> None:
    """500 sessions; the receiver answers 500 to a fifth of deliveries and is down for 15 s
    in the middle: every event arrives, signed, its body exactly the event."""
    receiver.fail_share = 0.2
    chaos_hooked(chaos, receiver)
    sent = bodies(500)
    sending = chaos.send_in_background(sent, rate=50)
    wait_for(lambda: len(receiver.received) >= 50, 60, what="deliveries under way")
    receiver.down()
    # The outage's length is the scenario (longer than the first few retries' waits, shorter
    # than all ten): nothing to wait for, since a receiver that is down sees nothing.
    time.sleep(15)
    receiver.start()
    back_at = time.monotonic()
    results = sending.result(120)
    assert {s.status for s in results} == {202}
    chaos.wait_ended({b["humanId"] for b in sent}, 120)
    wait_all_delivered(chaos, receiver, 120)
    all_delivered_after_back_s = time.monotonic() - back_at
    figures = verify_deliveries(chaos, receiver, sent)
    assert figures["events"] == 520  # 500 and the 20 that warm the deployment
    chaos.verify("webhooks-flaky", len(sent), sent, may_lose_answers=False)
    record(
        "webhooks_flaky_receiver",
        **figures,
        deliveries_retried=_retried(chaos),
        all_delivered_s_after_back=round(all_delivered_after_back_s, 1),
    )


def _retried(chaos: Chaos) -> int:
    """Deliveries that took more than one attempt."""
    from sqlalchemy import text

    from humanconnect.storage.db import session_factory

    with session_factory(chaos.db_url)() as db:
        return int(
            db.scalar(text("SELECT count(*) FROM webhook_deliveries WHERE attempts > 1")) or 0
        )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_and_redis_killed_mid_delivery_drop_nothing(
    chaos: Chaos, receiver: Receiver
) -> None:
    """A slow receiver keeps deliveries in flight after the exchanges are done; every worker
    is SIGKILLed mid-delivery, then Redis (restarted from its AOF): each event still
    arrives, some more than once."""
    # Slow enough (8 a second, under the 1 s timeout) that the kills land mid-delivery even
    # when the exchanges are slow on a busy machine: at 0.1 s the deliveries once kept up
    # with them and were all done before the kill. Quicker once Redis is back.
    receiver.delay_s = 0.5
    chaos_hooked(chaos, receiver)
    first = bodies(200)
    chaos.send(first)
    chaos.wait_ended({b["humanId"] for b in first}, 60)
    assert len(receiver.delivered_ids()) < 200, "deliveries were not in flight at the kill"
    chaos.signal_workers(signal.SIGKILL)
    killed_at = len(receiver.received)
    chaos.start_worker()

    second = bodies(200)
    chaos.send(second)
    chaos.wait_ended({b["humanId"] for b in second}, 60)
    wait_for(
        lambda: len(receiver.received) >= killed_at + 30, 90, what="deliveries under way again"
    )
    assert len(receiver.delivered_ids()) < 420, "deliveries were not in flight at the kill"
    chaos.redis.kill()
    wait_for(
        lambda: httpx.get(chaos.url + "/readyz", timeout=5).status_code == 503,
        30,
        what="the deployment to find Redis gone",
    )
    chaos.redis.start()
    receiver.delay_s = 0.1

    wait_all_delivered(chaos, receiver, 180)
    figures = verify_deliveries(chaos, receiver, first + second)
    assert figures["events"] == 420
    chaos.verify("webhooks-kills", 400, first + second, may_lose_answers=False)
    record("webhooks_worker_and_redis_killed", **figures)
