"""Webhooks: deliveries per second to a 0 ms receiver, and the exchange drain with webhooks
on (receiver fine, receiver hanging) against the same drain with them off, same run."""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.harness import Stack, count, stack, wait_http
from bench.throughput import drain_one
from humanconnect.cli.procs import free_port
from humanconnect.sandbox.standin import Faults
from humanconnect.webhooks.signing import new_secret


def _receiver(s: Stack, mode: str) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "bench.receiver", "--port", str(port), "--mode", mode]
    wait_http(f"http://127.0.0.1:{port}/", s.spawn(f"receiver-{mode}", argv))
    return f"http://127.0.0.1:{port}/hooks"


def _delivered(db_url: str) -> int:
    return count(db_url, "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")


def _drain(latency_ms: float, sessions: int, receiver: str | None) -> dict[str, Any]:
    """The drain (beat running, as webhooks need it) with webhooks off, or on to a receiver
    ("ok" or "hang"): then also how many were delivered by its end, and when all were."""
    if receiver is None:
        return drain_one(latency_ms, sessions, beat=True)

    def prepare(s: Stack) -> None:
        s.env.update(
            HUMANCONNECT_WEBHOOK_URLS=_receiver(s, receiver),
            HUMANCONNECT_WEBHOOK_SECRET=new_secret(),
        )

    def after(s: Stack, started: float, drained: int) -> dict[str, Any]:
        db = s.env["DATABASE_URL"]
        out: dict[str, Any] = {"delivered_when_drained": _delivered(db)}
        if receiver == "ok":
            while _delivered(db) < drained and time.monotonic() - started < 300:
                time.sleep(0.25)
            out["all_delivered_s"] = time.monotonic() - started
        return out

    return drain_one(latency_ms, sessions, beat=True, prepare=prepare, after=after)


def _delivery_rate(events: int) -> dict[str, Any]:
    """`events` committed with their deliveries, then one worker and beat deliver them to a
    0 ms receiver: deliveries per second, from the first tick to the last 2xx."""
    from humanconnect import events as outbox
    from humanconnect.storage.db import session_factory
    from humanconnect.webhooks.deliveries import Targets

    s = stack(Faults())
    try:
        hook = _receiver(s, "ok")
        s.env.update(HUMANCONNECT_WEBHOOK_URLS=hook, HUMANCONNECT_WEBHOOK_SECRET=new_secret())
        db_url = s.env["DATABASE_URL"]
        with session_factory(db_url)() as db:
            fields = [
                {"humanId": f"{i:024x}", "clientUserId": f"user-{i}", "requestId": f"r{i}"}
                for i in range(events)
            ]
            outbox.record_many(db, "connect.completed", fields, Targets((hook,)))
            db.commit()
        s.start_worker()
        time.sleep(3)  # the worker up before beat's first tick
        s.start_beat()
        started = None
        while time.monotonic() - (started or time.monotonic()) < 300:
            done = _delivered(db_url)
            if started is None and done:
                started = time.monotonic()
            if done >= events:
                break
            time.sleep(0.1)
        assert started is not None
        elapsed = time.monotonic() - started
        return {"events": events, "seconds": elapsed, "rate": events / elapsed}
    finally:
        s.close()


def webhooks_scenario(sessions: int = 3000) -> dict[str, Any]:
    """The delivery rate, then the 0 ms and 100 ms drains off / receiver fine / hanging."""
    out: dict[str, Any] = {"delivery to a 0 ms receiver": _delivery_rate(5000)}
    for latency in (0, 100):
        off = _drain(latency, sessions, None)
        fine = _drain(latency, sessions, "ok")
        hang = _drain(latency, sessions, "hang")
        out[f"{latency} ms"] = {
            "off": off,
            "receiver fine": fine,
            "receiver hanging": hang,
            "fine vs off": fine["rate"] / off["rate"],
            "hanging vs off": hang["rate"] / off["rate"],
        }
    return out
