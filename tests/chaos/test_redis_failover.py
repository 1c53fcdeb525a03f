"""The Redis primary lost mid-burst, with Sentinels to promote a replica: web, workers and
beat follow the failover without a restart, and no finish answered 202 is lost or doubled."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import cast

import httpx
import pytest

from humanconnect.cli.redis_group import Node, RedisGroup
from humanconnect.queue import EXCHANGE_TASK
from humanconnect.redis_keys import PENDING, QUEUE, UNACKED, request_status
from tests.support.chaos import Chaos, Sent, Tally, bodies
from tests.support.env import HANG_GUARD, wait_for
from tests.support.hooks import chaos_hooked, wait_all_delivered
from tests.support.receiver import Receiver

# Each scenario is a whole deployment on six Redis processes and a burst: the full suite only.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

#: The contract's bound on how long finishes are refused across a failover.
RETAKEN_WITHIN_S = 15


def taken(chaos: Chaos) -> int:
    """Finishes the web has taken so far: their status records on the primary."""
    return sum(1 for _ in chaos.r.scan_iter(request_status("*"), count=1000))


def longest_refusal(results: list[Sent]) -> float:
    """The longest stretch of the burst, by send time, with no finish accepted."""
    accepted = sorted(s.at for s in results if s.status == 202)
    return max((b - a for a, b in zip(accepted, accepted[1:], strict=False)), default=0.0)


def pids(chaos: Chaos) -> dict[str, int]:
    return {f"{p.name}{i}": p.proc.pid for i, p in enumerate(chaos.processes)}


def replaced(
    group: RedisGroup, break_it: Callable[[Node], None], then: Callable[[Node], None] | None = None
) -> Callable[[], float]:
    """What breaks the primary in a burst: `break_it` (kill, freeze) on it, wait for the
    Sentinels to promote a replica, then `then` on the old one; returns the seconds taken."""

    def run() -> float:
        old = group.primary()
        break_it(old)
        started = time.monotonic()
        group.wait_for_new_primary(old, 60)
        took = time.monotonic() - started
        if then is not None:
            then(old)
        return took

    return run


def burst_through(
    chaos: Chaos, break_it: Callable[[], float], scenario: str, receiver: Receiver
) -> Tally:
    """1,000 finishes at 100/s, `break_it()` once the web has taken a few hundred; then the
    refused ones sent again, a second burst on the same processes, and the verdict: every
    session stored once, and every event on the stream delivered to the webhook receiver."""
    chaos.standin.state.faults.latency_ms = 50
    chaos_hooked(chaos, receiver, HUMANCONNECT_REDIS_MIN_REPLICAS="1")
    before = pids(chaos)
    sent = bodies()
    sending = chaos.send_in_background(sent, rate=100)
    wait_for(
        lambda: taken(chaos) >= len(chaos.warm) + 300, 60, interval=0.1, what="burst under way"
    )
    failover_s = break_it()
    results = sending.result(300)
    statuses = {s.status for s in results}
    refused = [s for s in results if s.status == 503]
    # Refused, never failed: every refusal says when to send again.
    assert statuses <= {202, 503}, statuses
    assert all(s.retry_after for s in refused)
    assert max(s.seconds for s in results) < HANG_GUARD, "a finish was held open"
    gap = longest_refusal(results)
    assert gap <= RETAKEN_WITHIN_S, f"no finish taken for {gap:.1f} s"
    # The client sends the refused ones again, as apps do after Retry-After.
    chaos.send_until_accepted([s.body for s in refused], timeout=120)
    # A second burst after the failover, served by the same processes.
    second = bodies(200)
    chaos.send_until_accepted(second, timeout=120)
    everyone = [*sent, *second]
    chaos.wait_ended({b["humanId"] for b in everyone}, 300)
    # Beat still sends its jobs, to the new primary.
    runs = chaos.beat_runs("relay-events")
    wait_for(lambda: chaos.beat_runs("relay-events") > runs, 60, what="beat to send again")
    assert pids(chaos) == before and all(p.alive() for p in chaos.processes)
    tally = chaos.verify(scenario, len(everyone), everyone, may_lose_answers=False)
    delivered = wait_all_delivered(chaos, receiver, 180)
    assert len(delivered) >= len(everyone)  # a completion event each, at least
    tally.extra.update(
        webhooks_delivered=len(delivered),
        accepted_first_time=sum(1 for s in results if s.status == 202),
        refused_503=len(refused),
        longest_without_an_accept_s=round(gap, 2),
        failover_s=round(failover_s, 2),
        slowest_503_s=round(max((s.seconds for s in refused), default=0.0), 3),
    )
    tally.report()
    return tally


def test_primary_killed_mid_burst_loses_and_doubles_nothing(
    ha_chaos: Chaos, receiver: Receiver
) -> None:
    """SIGKILL (its machine lost): a replica is promoted, the web's scripts are loaded on it
    again, workers consume from it, one beat sends; the old primary rejoins as a replica."""
    group = ha_chaos.group
    assert group is not None
    old = group.primary()

    burst_through(ha_chaos, replaced(group, group.kill), "redis-failover-sigkill", receiver)
    group.restart(old)
    wait_for(lambda: old.role() == "slave", 60, what="the old primary to rejoin as a replica")
    assert old.ask("INFO", "replication")  # answers, as a replica of the new primary


def test_primary_frozen_then_resumed_comes_back_a_replica(
    ha_chaos: Chaos, receiver: Receiver
) -> None:
    """SIGSTOP (a hung machine): the workers' blocked pops on it hang, not fail; after the
    promotion it is resumed, demoted, and what it answered is neither lost nor doubled."""
    group = ha_chaos.group
    assert group is not None
    old = group.primary()

    burst_through(
        ha_chaos,
        replaced(group, group.freeze, then=group.thaw),
        "redis-failover-sigstop",
        receiver,
    )
    wait_for(lambda: old.role() == "slave", 60, what="the resumed primary to be demoted")


def test_lost_replicas_turn_finishes_away_as_not_replicated_and_lose_nothing(
    ha_chaos: Chaos,
) -> None:
    """With one replica required: one of two lost, finishes go on; both lost, a finish is
    `503 not_replicated` (queued all the same); once they are back, the resend is answered
    as its duplicate and every session ends stored once."""
    group = ha_chaos.group
    assert group is not None
    ha_chaos.start(HUMANCONNECT_REDIS_MIN_REPLICAS="1")
    first, second = group.replicas_now()
    group.kill(first)
    still = bodies(50)
    assert {s.status for s in ha_chaos.send(still)} == {202}

    group.kill(second)
    before = taken(ha_chaos)
    alone = bodies(50)
    refused = ha_chaos.send(alone)
    assert {(s.status, s.retry_after) for s in refused} == {(503, "1")}
    probe = httpx.post(ha_chaos.url + "/connect/finish", json=alone[0], timeout=HANG_GUARD)
    assert probe.status_code == 503 and probe.json()["reason"] == "not_replicated"
    # Queued all the same: the primary holds a request for each (the probe was a duplicate)
    assert taken(ha_chaos) == before + len(alone)

    group.restart(first)
    group.restart(second)
    wait_for(lambda: len(group.replicas_now()) == 2, 60, what="both replicas back")
    ha_chaos.send_until_accepted(alone)
    # Each resend was answered as its duplicate: no second request for any of them
    assert taken(ha_chaos) == before + len(alone)
    everyone = [*still, *alone]
    ha_chaos.wait_ended({b["humanId"] for b in everyone}, 120)
    tally = ha_chaos.verify("redis-replicas-lost", len(everyone), everyone, may_lose_answers=False)
    tally.report()


def test_a_message_popped_but_never_noted_unacked_comes_back_after_a_promotion(
    ha_chaos: Chaos,
) -> None:
    """Kombu pops a message (BRPOP) and notes it unacked in a second round trip. A failover
    between the two, or a note that never reached the replica, leaves the promoted replica
    with the message gone and no note of it: the accept's pending entry, replicated with it,
    is what brings it back. The reconciler sends it again and it is exchanged once."""
    group = ha_chaos.group
    assert group is not None
    # The chaos visibility timeout (30 s): the reconciler sends again after 25 s of no progress.
    ha_chaos.start(HUMANCONNECT_REDIS_MIN_REPLICAS="1")
    ha_chaos.signal_workers(signal.SIGTERM)  # nobody consumes: what is accepted stays queued
    sent = bodies(20)
    assert {s.status for s in ha_chaos.send(sent)} == {202}
    r = ha_chaos.r
    # What ten BRPOPs leave behind when their unacked notes are lost: the messages gone.
    # (Taken out by name: beat's own jobs queue up beside them while no worker runs.)
    before = cast(list[bytes], r.lrange(QUEUE, 0, -1))
    exchanges = [m.decode() for m in before if json.loads(m)["headers"]["task"] == EXCHANGE_TASK]
    assert len(exchanges) == 20
    assert all(r.lrem(QUEUE, 1, m) == 1 for m in exchanges[-10:])
    assert r.execute_command("WAIT", 2, 5000) == 2, "the pops did not reach both replicas"
    old = group.primary()
    group.kill(old)
    group.wait_for_new_primary(old, 60)
    promoted = ha_chaos.r
    # Beat's own jobs queue up beside them meanwhile: count the exchanges.
    tasks = [json.loads(m)["headers"]["task"] for m in promoted.lrange(QUEUE, 0, -1)]
    assert tasks.count(EXCHANGE_TASK) == 10 and promoted.hlen(UNACKED) == 0
    assert promoted.zcard(PENDING) >= 20
    for _ in range(2):
        ha_chaos.start_worker()
    ha_chaos.wait_ended({b["humanId"] for b in sent}, 120)
    tally = ha_chaos.verify("redis-failover-lost-pop", len(sent), sent, may_lose_answers=False)
    tally.report()


def test_workers_blocked_on_a_demoted_primary_go_on_consuming(ha_chaos: Chaos) -> None:
    """A coordinated failover (`SENTINEL FAILOVER`, as for maintenance) demotes the primary
    while idle workers wait in BRPOP on it: Redis answers them `UNBLOCKED ... master ->
    replica`, which has killed Celery workers ("Unrecoverable error"). Here they reconnect
    to the new primary and take the next burst, the same processes."""
    group = ha_chaos.group
    assert group is not None
    ha_chaos.start(HUMANCONNECT_REDIS_MIN_REPLICAS="1")
    before = pids(ha_chaos)
    old = group.primary()
    assert group.sentinels[0].ask("SENTINEL", "FAILOVER", group.master_name) is not None
    group.wait_for_new_primary(old, 60)
    wait_for(lambda: old.role() == "slave", 60, what="the old primary to be demoted")
    after = bodies(100)
    ha_chaos.send_until_accepted(after, timeout=120)
    ha_chaos.wait_ended({b["humanId"] for b in after}, 120)
    assert pids(ha_chaos) == before and all(p.alive() for p in ha_chaos.processes)
    logs = "".join(p.output() for p in ha_chaos.workers)
    # Their blocked pops were broken by the demotion (a connection error to Kombu, which
    # reconnects; an UNBLOCKED reply taken for a command error would end the process).
    assert "Connection to broker lost" in logs
    assert "Unrecoverable error" not in logs
    ha_chaos.verify(
        "redis-coordinated-failover", len(after), after, may_lose_answers=False
    ).report()


def test_a_primary_refusing_writes_without_its_replicas_is_waited_out(ha_chaos: Chaos) -> None:
    """The Sentinel deployment's `min-replicas-to-write 1` (docker-compose.sentinel.yml):
    with both replicas lost mid-drain the primary answers every write `NOREPLICAS`. Finishes
    are refused 503, the workers and beat wait it out (the same processes), and once the
    replicas are back everything accepted ends stored once."""
    group = ha_chaos.group
    assert group is not None
    for node in group.data:  # on every node: a promoted replica enforces it too
        assert node.ask("CONFIG", "SET", "min-replicas-to-write", "1") == b"OK"
    ha_chaos.start(HUMANCONNECT_REDIS_MIN_REPLICAS="1")
    before = pids(ha_chaos)
    draining = bodies(100)
    assert {s.status for s in ha_chaos.send(draining)} == {202}
    replicas = group.replicas_now()
    for replica in replicas:
        group.kill(replica)
    with pytest.raises(Exception, match="NOREPLICAS"):
        ha_chaos.r.set("probe", "1")
    refused = ha_chaos.send(bodies(20))
    assert {(s.status, s.retry_after) for s in refused} == {(503, "1")}
    # Beat renews its lock every pass (1 s): over an outage of this length every process
    # has met the refusal several times over (the scenario's one fixed wait).
    time.sleep(8)
    assert pids(ha_chaos) == before and all(p.alive() for p in ha_chaos.processes)

    for replica in replicas:
        group.restart(replica)
    wait_for(lambda: len(group.replicas_now()) == 2, 60, what="both replicas back")
    ha_chaos.send_until_accepted([s.body for s in refused], timeout=120)
    everyone = [*draining, *(s.body for s in refused)]
    ha_chaos.wait_ended({b["humanId"] for b in everyone}, 300)
    runs = ha_chaos.beat_runs("relay-events")
    wait_for(lambda: ha_chaos.beat_runs("relay-events") > runs, 60, what="beat to send again")
    assert pids(ha_chaos) == before and all(p.alive() for p in ha_chaos.processes)
    ha_chaos.verify("redis-noreplicas", len(everyone), everyone, may_lose_answers=False).report()
