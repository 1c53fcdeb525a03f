"""Traces: one finish is one trace across the web, the worker and beat; nothing secret in any
exported span; a collector that is down costs the finishes nothing; off, nothing at all."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from humanconnect.cli.procs import commands, free_port, stop_all
from humanconnect.redis_keys import QUEUE
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.tracing import CONTEXT_FIELD, REQUEST_ID, wanted
from tests import factories
from tests.support.env import (
    CLIENT_SECRET,
    FERNET_KEY,
    ROOT,
    TICKET_KEY,
    deployment_env,
    service_env,
    timed,
    wait_for,
)
from tests.support.hooks import SECRET
from tests.support.otlp import OtlpReceiver, Span
from tests.support.processes import Deployment, Process, run_python, start_web, start_worker
from tests.support.receiver import Receiver
from tests.support.scan import assert_no_secrets, state_counts, stored_users, stream_entries
from tests.support.servers import RedisServer

FINISHES = 20
REDIS_PASSWORD = "trace-test-redis-password-0123"
#: The services' spans reach the receiver a tenth of a second after they end.
QUICK_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
#: The exporters' timeout when the collector is down (each export gives up after it).
EXPORT_TIMEOUT_S = 5
SERVER_SPAN = "POST /connect/finish"
EXCHANGE_RUN = "run/humanconnect.exchange_session"
#: The attribute of a session's span in a batch: how many sessions ran together.
BATCH_SIZE = "humanconnect.batch"


def _password_url(server: RedisServer) -> str:
    """`server` made to ask for a password; the URL with it, as a deployment would set it."""
    redis.Redis(port=server.port).config_set("requirepass", REDIS_PASSWORD)
    return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"


def _problems(spans: list[Span]) -> list[str]:
    """What keeps `spans` (one trace) from being a whole finish: both services, one root,
    every parent present, the upstream call, the store and the webhook attempt."""
    ids = {s.span_id for s in spans}
    roots = [s.name for s in spans if not s.parent_id]
    found = []
    if roots != [SERVER_SPAN]:
        found.append(f"roots {roots}")
    orphans = sorted({s.name for s in spans if s.parent_id and s.parent_id not in ids})
    if orphans:
        found.append(f"parents missing for {orphans}")
    if not {"web", "worker"} <= {s.service for s in spans}:
        found.append(f"services {sorted({s.service for s in spans})}")
    checks = {
        "accept": lambda s: s.name == "humanconnect.accept" and REQUEST_ID in s.attributes,
        "task": lambda s: s.name == EXCHANGE_RUN and REQUEST_ID in s.attributes,
        "upstream call": lambda s: (
            "/v1/connect/tokens"
            in str(s.attributes.get("http.url", "")) + str(s.attributes.get("url.full", ""))
        ),
        "store": lambda s: s.scope.endswith("sqlalchemy") and s.name.startswith("INSERT"),
        "webhook attempt": lambda s: s.name == "humanconnect.webhook_attempt",
    }
    found += [f"no {what}" for what, check in checks.items() if not any(map(check, spans))]
    return found


def _traces_by_request(otlp: OtlpReceiver, request_ids: list[str]) -> dict[str, list[Span]]:
    """Each finish's trace: the one whose web server span names its requestId."""
    traces = otlp.traces()
    out: dict[str, list[Span]] = {}
    for spans in traces.values():
        for s in spans:
            if s.name == SERVER_SPAN and s.attributes.get(REQUEST_ID) in request_ids:
                out[str(s.attributes[REQUEST_ID])] = spans
    return out


def _wait_whole(otlp: OtlpReceiver, request_ids: list[str], timeout: float) -> dict[str, Any]:
    """Until every finish's trace is whole (spans arrive in batches, from three processes);
    then the traces, else fail naming what each still lacks."""

    def whole() -> dict[str, Any]:
        traces = _traces_by_request(otlp, request_ids)
        problems = {r: _problems(traces[r]) if r in traces else ["no trace"] for r in request_ids}
        problems = {r: p for r, p in problems.items() if p}
        if problems:
            raise AssertionError(f"{len(problems)} traces not whole: {problems}")
        return traces

    return wait_for(whole, timeout, interval=0.25, what="every finish's trace to be whole")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_each_finish_is_one_whole_trace_and_no_span_holds_a_secret(
    own_redis: RedisServer,
    sqlite_url: str,
    standin: Running,
    receiver: Receiver,
    otlp: OtlpReceiver,
    tmp_path: Path,
    batch: int,
) -> None:
    """20 finishes through web, worker and beat: 20 traces with both services, one root and
    every parent; a retried exchange stays in its trace; each webhook attempt is a part of
    its finish's; log lines carry the trace; no exported byte holds a token, ticket or secret.
    With `batch` 8 the worker runs first tries together, each session's steps still a span
    of its own finish's trace."""
    # Given web, worker and beat exporting to the receiver, with tickets required, a Redis
    # that asks for a password, webhooks on, and the Authorization header captured if allowed
    env = deployment_env(
        _password_url(own_redis),
        sqlite_url,
        standin.url,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST="authorization,prefer",
        HUMANCONNECT_TICKET_KEY=TICKET_KEY,
        HUMANCONNECT_WEBHOOK_URLS=receiver.url,
        HUMANCONNECT_WEBHOOK_SECRET=SECRET,
        HUMANCONNECT_LOG_JSON="1",
        HUMANCONNECT_EXCHANGE_BATCH=str(batch),
        **QUICK_EXPORT,
    )
    started: list[Process] = []
    try:
        web, url = start_web(env, ROOT, tmp_path / "web.log")
        started.append(web)
        worker = start_worker(env, ROOT, tmp_path / "worker.log")
        started.append(worker)
        started.append(Process("beat", commands(0, tmp_path)["beat"], env, ROOT, tmp_path / "b"))
        bodies = [factories.finish_body() for _ in range(FINISHES)]
        tickets = [h["Authorization"] for h in factories.ticket_headers(bodies)]

        def finish(i: int) -> str:
            # Half carry their ticket in the query, as the mobile SDKs send it; every fourth
            # waits for its answer (the waiting queue).
            ticket = tickets[i].removeprefix("Bearer ")
            query, headers = (
                ({"ticket": ticket}, {}) if i % 2 else ({}, {"Authorization": tickets[i]})
            )
            if i % 4 == 3:
                headers["Prefer"] = "wait=10"
            resp = httpx.post(
                url + "/connect/finish", json=bodies[i], params=query, headers=headers, timeout=30
            )
            assert resp.status_code in (201, 202), resp.text
            return str(resp.json()["requestId"])

        # When the first finish meets the upstream down until its exchange waits for a retry
        standin.state.faults = Faults(down=True)
        request_ids = [finish(0)]
        wait_for(
            lambda: (
                httpx.get(f"{url}/connect/finish/{request_ids[0]}").json()["status"] == "retrying"
            ),
            60,
            what="the first exchange to be retried",
        )
        # ... and the upstream is back for it and 19 more
        standin.state.faults = Faults()
        request_ids += [finish(i) for i in range(1, FINISHES)]
        wait_for(
            lambda: state_counts(sqlite_url).get("succeeded") == FINISHES,
            120,
            interval=0.25,
            what="every finish stored",
        )
        wait_for(
            lambda: len(receiver.delivered_ids()) >= FINISHES,
            60,
            interval=0.25,
            what="every connect.completed delivered",
        )

        # Then each finish is one whole trace across the web and the worker
        traces = _wait_whole(otlp, request_ids, 60)
        assert len({spans[0].trace_id for spans in traces.values()}) == FINISHES
        # ... the retried one too: its failed calls, its queued retry and its next run in it
        retried = traces[request_ids[0]]
        names = Counter(s.name for s in retried)
        assert names[EXCHANGE_RUN] >= 2 and names["apply_async/humanconnect.exchange_session"] >= 1
        statuses = [s.attributes.get("http.status_code") for s in retried if s.name == "POST"]
        assert 503 in statuses and 201 in statuses, statuses
        # ... those that came through the waiting queue too (Celery's own span says which
        # queue; a batch's session span does not)
        queues = [str(s.attributes.get("celery.delivery_info")) for t in traces.values() for s in t]
        assert any("'routing_key': 'humanconnect.waiting'" in q for q in queues) or batch > 1
        # ... and with batches, most sessions' spans say they ran in one
        batched = [s for t in traces.values() for s in t if s.attributes.get(BATCH_SIZE)]
        assert (len(batched) >= FINISHES // 2) is (batch > 1)
        # ... and each span of ours names its finish
        for rid, spans in traces.items():
            ours = [
                s for s in spans if s.name in (SERVER_SPAN, "humanconnect.accept", EXCHANGE_RUN)
            ]
            assert {s.attributes.get(REQUEST_ID) for s in ours} == {rid}
        # Beat exports its own spans under its own name (its outbox sweep every 5 s)
        wait_for(lambda: any(s.service == "beat" for s in otlp.snapshot()), 30, what="beat's spans")
        # The worker's log lines carry their finish's trace
        lines = [json.loads(x) for x in worker.output().splitlines() if x.startswith("{")]
        succeeded = {r["requestId"]: r for r in lines if "exchange succeeded" in r["message"]}
        for rid, spans in traces.items():
            assert succeeded[rid]["traceId"] == spans[0].trace_id
    finally:
        stop_all(started)

    # And no exported span holds a token, ticket, key, password or sealed token
    users = stored_users(sqlite_url)
    assert len(users) == FINISHES
    assert_no_secrets(
        [
            CLIENT_SECRET,
            TICKET_KEY,
            FERNET_KEY,
            SECRET,
            REDIS_PASSWORD,
            # A Fernet token's first bytes: a sealed session or public token.
            "gAAAAA",
            *tickets,
            *(t.removeprefix("Bearer ") for t in tickets),
            *(b["sessionToken"] for b in bodies),
            *(u.access_token for u in users.values()),
            *(u.public_token or "" for u in users.values()),
        ],
        texts={"exported spans": otlp.received()},
    )
    captured = [s.attributes.get("http.request.header.authorization") for s in otlp.snapshot()]
    assert any(captured), "the Authorization header was not captured: the scan proves less"
    assert b"ticket=" not in otlp.received()
    # And the trace context the outbox keeps reached neither the stream nor a webhook
    entries = stream_entries(redis.Redis(port=own_redis.port, password=REDIS_PASSWORD))
    assert len(entries) == FINISHES and not any(CONTEXT_FIELD in e for e in entries)
    assert not any(CONTEXT_FIELD in r.body for r in receiver.received)


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_collector_that_is_down_costs_the_finishes_nothing(
    deploy: Callable[..., Deployment], standin: Running
) -> None:
    """Tracing on, its endpoint a closed port: every finish is answered 202 without waiting
    for an export, and all are stored as usual."""
    # Given web and worker exporting to a port nobody listens on
    d = deploy(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        OTEL_EXPORTER_OTLP_TIMEOUT=str(EXPORT_TIMEOUT_S),
        **QUICK_EXPORT,
    )
    # When 20 finishes arrive one after another
    answers = [
        timed(lambda: httpx.post(d.url + "/connect/finish", json=factories.finish_body()))
        for _ in range(FINISHES)
    ]
    # Then each is accepted, none having waited out an export's timeout, and all are stored
    assert [r.status_code for r, _ in answers] == [202] * FINISHES
    assert max(seconds for _, seconds in answers) < EXPORT_TIMEOUT_S
    wait_for(
        lambda: state_counts(d.db_url).get("succeeded") == FINISHES,
        60,
        interval=0.25,
        what="every finish stored",
    )
    assert standin.state.exchanges.total() == FINISHES
    # ... while the exporters did try, and failed
    wait_for(lambda: "export" in d.worker.output().lower(), 30, what="a failed export logged")
    assert d.web.alive() and d.worker.alive()


RESEND = r"""
import sys
from humanconnect import queue, tracing
from humanconnect.request import ExchangeRequest
from humanconnect.settings import Settings

redis_url, key, parent = sys.argv[1:]
settings = Settings.model_validate(
    {"REDIS_URL": redis_url, "HUMANAPI_CLIENT_ID": "c" * 40, "HUMANCONNECT_ENCRYPTION_KEYS": key}
)
assert tracing.install("worker", settings)
# The status record the web's accept script wrote, as the reconciler reads it back.
record = {"humanId": "h" * 24, "clientId": "c" * 40, "sealedSessionToken": "sealed",
          "receivedUs": "1", "traceparent": parent}
request = ExchangeRequest.from_record("resentrequest000000001", record)
queue.send_exchange(queue.sender(settings), request)
"""


def test_a_resent_request_continues_its_finish_trace(
    redis_url: str, redis_client: redis.Redis, otlp: OtlpReceiver
) -> None:
    """The reconciler's re-send of a lost message (a request read back from its status record)
    is queued in the trace the web's accept started, as a child of the accept's span."""
    # Given the traceparent an accept stored in a request's status record
    trace_id, accept_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    parent = f"00-{trace_id}-{accept_span}-01"
    # When a worker sends the request again
    env = service_env(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url, **QUICK_EXPORT)
    run_python(RESEND, redis_url, FERNET_KEY, parent, cwd=ROOT, env=env)
    # Then its send is a span of that trace under the accept's, and the message carries it on
    sent = wait_for(lambda: [s for s in otlp.snapshot() if s.name.startswith("apply_async/")], 30)
    assert [(s.trace_id, s.parent_id, s.service) for s in sent] == [
        (trace_id, accept_span, "worker")
    ]
    message = json.loads(redis_client.lindex(QUEUE, 0) or b"{}")
    assert message["headers"]["traceparent"] == f"00-{trace_id}-{sent[0].span_id}-01"


SWEEP = r"""
import sys
import redis
from opentelemetry import trace
from humanconnect import events, tracing
from humanconnect.settings import Settings
from humanconnect.storage.db import session_factory

redis_url, db_url, key = sys.argv[1:]
settings = Settings.model_validate({
    "REDIS_URL": redis_url, "DATABASE_URL": db_url, "HUMANAPI_CLIENT_ID": "c" * 40,
    "HUMANCONNECT_ENCRYPTION_KEYS": key,
})
assert tracing.install("worker", settings)
# An event recorded inside a finish's span, that its worker could not relay at once.
with trace.get_tracer("test").start_as_current_span("the finish") as span:
    with session_factory(db_url)() as db:
        events.record(db, "connect.completed", humanId="h", clientUserId="u", requestId="r")
        db.commit()
with session_factory(db_url)() as db:
    assert events.relay_pending(db, redis.Redis.from_url(redis_url), "humanconnect:events",
                                grace_s=0) == 1
"""


def test_the_outbox_sweep_links_each_event_to_its_finish(
    redis_url: str, redis_client: redis.Redis, sqlite_url: str, otlp: OtlpReceiver
) -> None:
    """An event the sweep relays later is sent in a span linked to the finish that recorded
    it; the finish's context stays in the outbox, out of the stream."""
    # When a worker's sweep relays an event recorded inside a finish's span
    env = service_env(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url, **QUICK_EXPORT)
    run_python(SWEEP, redis_url, sqlite_url, FERNET_KEY, cwd=ROOT, env=env)
    # Then the relay's span links to the finish's
    spans = wait_for(lambda: len(otlp.snapshot()) >= 2 and otlp.snapshot(), 30)
    finish = next(s for s in spans if s.name == "the finish")
    relay = next(s for s in spans if s.name == "humanconnect.relay")
    assert relay.links == [(finish.trace_id, finish.span_id)]
    assert relay.trace_id != finish.trace_id
    # ... and the stream's entry is the event without it
    (entry,) = stream_entries(redis_client)
    assert entry["requestId"] == "r" and CONTEXT_FIELD not in entry


NOTHING_IMPORTED = r"""
import json, sys
# What the libraries import of OpenTelemetry themselves whenever it is installed: FastAPI's
# native telemetry the API, redis-py's observability the SDK's metrics part.
import celery, fastapi, kombu, redis, redis.asyncio, requests, sqlalchemy, urllib3
libraries = {m for m in sys.modules if m.startswith("opentelemetry")}

from humanconnect import tracing
from humanconnect.settings import Settings
import producer.main, worker.celery, worker.tasks
from producer.app import create_app

settings = Settings.model_validate({
    "REDIS_URL": "redis://127.0.0.1:9/0",
    "HUMANAPI_CLIENT_ID": "c" * 40,
    "HUMANCONNECT_ENCRYPTION_KEYS": sys.argv[1],
})
on = [tracing.install(role, settings) for role in tracing.ROLES]
create_app(settings)
from opentelemetry import trace
print(json.dumps({
    "on": on,
    "enabled": tracing.enabled(),
    "ours": sorted(m for m in sys.modules if m.startswith("opentelemetry") and m not in libraries),
    "provider": type(trace.get_tracer_provider()).__name__,
}))
"""


def test_without_the_variables_nothing_of_opentelemetry_is_imported(tmp_path: Path) -> None:
    """No OTEL_ variable: installing tracing for each process installs nothing, and importing
    and building the web and worker apps imports no OpenTelemetry module beyond those the
    libraries import themselves (no SDK tracer, exporter or instrumentation), and sets no
    tracer provider."""
    env = {k: v for k, v in service_env().items() if not k.startswith("OTEL_")}
    proc = run_python(NOTHING_IMPORTED, FERNET_KEY, cwd=ROOT, env=env)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {
        "on": [False, False, False],
        "enabled": False,
        "ours": [],
        "provider": "ProxyTracerProvider",
    }


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "humanconnect", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ],
)
def test_the_standard_variables_turn_tracing_on(environ: dict[str, str], on: bool) -> None:
    """An OTLP endpoint or a traces exporter turns traces on; `none` or a disabled SDK not."""
    assert wanted(environ) is on


def test_service_names_tell_the_processes_apart() -> None:
    """The role alone by default; a configured name gets the role after it, once."""
    from humanconnect.otel import service_name

    assert [service_name(r, None) for r in ("web", "worker", "beat")] == ["web", "worker", "beat"]
    assert service_name("worker", "unknown_service") == "worker"
    assert service_name("web", "humanconnect") == "humanconnect-web"
    assert service_name("web", "humanconnect-web") == "humanconnect-web"
    assert service_name("beat", "beat") == "beat"


def test_the_scrubber_leaves_nothing_secret_in_a_span() -> None:
    """Whatever an instrumentation or an exception put in a span (a Redis command's
    arguments, a URL's credentials and query, a header, SQL parameters, a secret in an
    exception's message), the exported span holds none of it."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    from humanconnect.span_scrub import Scrubber, ScrubbingExporter
    from humanconnect.tickets import mint

    # Given a provider of the test's own whose spans leave through the scrubber
    memory = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(
        SimpleSpanProcessor(ScrubbingExporter(memory, Scrubber([CLIENT_SECRET])))
    )
    ticket = mint(TICKET_KEY, "user-1", 60)
    sealed = "gAAAAABn" + "x" * 60
    session_token = "s" * 32
    # When spans carry each kind of secret
    redis_tracer = provider.get_tracer("opentelemetry.instrumentation.redis")
    with redis_tracer.start_as_current_span(f"EVALSHA {sealed}") as span:
        span.set_attribute("db.statement", f"EVALSHA abc 1 hc:claim:x {sealed} {session_token}")
        span.set_attribute("net.peer.name", "redis://:hunter2password@127.0.0.1:6379/0")
    tracer = provider.get_tracer("opentelemetry.instrumentation.fastapi")
    with tracer.start_as_current_span("POST /connect/finish") as span:
        span.set_attribute("http.target", f"/connect/finish?ticket={ticket}")
        span.set_attribute("http.url", f"http://u:p4ssw0rd-long@h/connect/finish?ticket={ticket}")
        span.set_attribute("url.query", f"ticket={ticket}")
        span.set_attribute("http.request.header.authorization", (f"Bearer {ticket}",))
        span.set_attribute("celery.kwargs", f"{{'sealed_session_token': '{sealed}'}}")
        span.record_exception(
            ValueError(
                f"upstream said clientSecret={CLIENT_SECRET} accessToken: tok-123456789\n"
                "[SQL: INSERT INTO users VALUES (?)]\n"
                f"[parameters: ('{session_token}',)]\n"
                "(Background on this error at: https://sqlalche.me/e/20/e3q8)"
            )
        )
        span.set_status(Status(StatusCode.ERROR, f"failed for {CLIENT_SECRET}"))
    # Then none of it is exported, and the spans still say what happened
    exported = memory.get_finished_spans()
    text = repr(
        [
            (s.name, dict(s.attributes or {}), [dict(e.attributes or {}) for e in s.events])
            + (s.status.description,)
            for s in exported
        ]
    )
    for needle in (CLIENT_SECRET, ticket, sealed, session_token, "hunter2", "p4ssw0rd", "tok-12"):
        assert needle not in text
    redis_span, web_span = exported
    assert (
        redis_span.attributes is not None and redis_span.attributes["db.statement"] == "EVALSHA ?"
    )
    assert web_span.attributes is not None
    assert web_span.attributes["http.target"] == "/connect/finish"
    assert "url.query" not in web_span.attributes and "celery.kwargs" not in web_span.attributes
    assert "INSERT INTO users" in text and "ValueError" in text
