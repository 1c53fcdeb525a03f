"""/openapi.json tells the truth: the finish body's schema is the handler's model, its
constraints are the ones the handler enforces, and every answer a route gives (and only
those) is documented, with its body, headers and content type."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import redis
from fastapi.testclient import TestClient
from httpx import Response
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr
from sqlalchemy import text

from humanconnect import status_records
from humanconnect.runtime import Runtime
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.settings import Settings
from humanconnect.states import RequestState
from humanconnect.storage.db import session_factory
from producer.app import create_app
from producer.body import MAX_BODY_BYTES, FinishBody
from tests import factories
from tests.support.env import CLIENT_ID, ROOT, TICKET_KEY, deployment_env
from tests.support.processes import start_worker
from tests.support.servers import RedisServer

API_TOKEN = "openapi-read-back-token-0123456789"
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}
FIELDS = ("humanId", "clientId", "sessionToken")


def _doc(app_settings: Settings) -> dict[str, Any]:
    return create_app(app_settings).openapi()


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A validator for one schema of `doc`, its `#/components/...` references resolved.
    jsonschema_rs (what schemathesis uses) reads `pattern` as ECMA 262 does, where `$` is
    the end of the string, as in the handler's pydantic-core."""
    return jsonschema_rs.validator_for({**schema, "components": doc["components"]})


def test_the_finish_body_schema_is_the_models_with_this_apps_client_id(
    make_settings: Callable[..., Settings],
) -> None:
    """FinishBody in the document is producer.body.FinishBody's own schema, but for clientId,
    which is narrowed to the one value the handler accepts."""
    doc = _doc(make_settings())
    documented = doc["components"]["schemas"]["FinishBody"]
    model = FinishBody.model_json_schema()
    assert documented["properties"]["clientId"].pop("const") == CLIENT_ID
    assert documented == model
    assert set(model["required"]) == set(FIELDS)
    for name in FIELDS:
        field = model["properties"][name]
        assert (field["type"], field["minLength"], field["maxLength"]) == ("string", 1, 128)
        assert field["pattern"] == "^[A-Za-z0-9_-]+$"
    operation = doc["paths"]["/connect/finish"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {
        "oneOf": [
            {"$ref": "#/components/schemas/FinishBody"},
            {"$ref": "#/components/schemas/ClosePayload"},
        ]
    }


def test_no_route_documents_fastapis_validation_error(
    make_settings: Callable[..., Settings],
) -> None:
    """The handlers validate their input themselves: FastAPI's 422 is never the answer."""
    assert "HTTPValidationError" not in json.dumps(_doc(make_settings()))


def test_the_read_back_declares_its_bearer_token(make_settings: Callable[..., Settings]) -> None:
    doc = _doc(make_settings())
    assert doc["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"
    assert doc["paths"]["/users/{client_user_id}"]["get"]["security"] == [{"bearerToken": []}]


def test_metrics_are_documented_as_prometheus_text(
    make_settings: Callable[..., Settings],
) -> None:
    content = _doc(make_settings())["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == [CONTENT_TYPE_LATEST]


# Values on both sides of every documented constraint, JSON that is not a string at all,
# and missing fields; each field mostly well-formed, so that whole valid bodies are common.
good = st.from_regex(r"\A[A-Za-z0-9_-]{1,128}\Z")
bad = st.one_of(
    st.text(max_size=130),
    st.sampled_from(["", "a" * 129, "abc\n", "\nabc", "a b", "é", "a/b", "a.b"]),
    st.integers() | st.none() | st.booleans() | st.lists(st.text(max_size=2), max_size=2),
)
MISSING = object()


def field(well_formed: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    kinds = st.sampled_from(["good"] * 4 + ["bad", "missing"])
    return kinds.flatmap(
        lambda kind: {"good": well_formed, "bad": bad, "missing": st.just(MISSING)}[kind]
    )


fields = st.fixed_dictionaries(
    {
        "humanId": field(good),
        "clientId": field(st.just(CLIENT_ID) | good),
        "sessionToken": field(good),
    }
)
# Unknown fields are dropped; the snake_case spellings the model also reads are not in the
# document (only in its description), so they stay out of this comparison.
unknown = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in FIELDS and "_" not in k),
    st.integers() | st.text(max_size=4),
    max_size=2,
)
body = st.tuples(fields, unknown).map(
    lambda both: {**both[1], **{k: v for k, v in both[0].items() if v is not MISSING}}
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sent=body)
def test_the_documented_body_is_exactly_what_the_handler_accepts(
    client: TestClient, sent: dict[str, Any]
) -> None:
    """A body the document calls valid is taken (202, or 409 for a sessionToken already
    used with another humanId). One valid but for the clientId's value is refused with 422,
    any other with 400."""
    doc = client.get("/openapi.json").json()
    resp = client.post("/connect/finish", json=sent)
    if _validator(doc, doc["components"]["schemas"]["FinishBody"]).is_valid(sent):
        event("valid")
        assert resp.status_code in (202, 409), resp.text
    elif _validator(doc, FinishBody.model_json_schema()).is_valid(sent):
        event("another clientId")
        assert resp.status_code == 422, resp.text
    else:
        event("invalid")
        assert resp.status_code == 400, resp.text


class Answers:
    """Requests against one app; each answer must be documented and match its documentation.
    Remembers which documented answers were seen."""

    def __init__(self, client: TestClient, seen: set[tuple[str, str, str]]):
        self.client = client
        self.doc = client.get("/openapi.json").json()
        self.seen = seen

    def get(self, template: str, path: str, **kwargs: Any) -> Response:
        return self.conforms("get", template, self.client.get(path, **kwargs))

    def delete(self, template: str, path: str, **kwargs: Any) -> Response:
        return self.conforms("delete", template, self.client.delete(path, **kwargs))

    def post(
        self, template: str = "/connect/finish", path: str = "/connect/finish", **kwargs: Any
    ) -> Response:
        return self.conforms("post", template, self.client.post(path, **kwargs))

    def conforms(self, method: str, template: str, resp: Response) -> Response:
        label = f"{method.upper()} {template} -> {resp.status_code}: {resp.text[:200]}"
        answers = self.doc["paths"][template][method]["responses"]
        answer = answers.get(str(resp.status_code))
        assert answer is not None, f"undocumented: {label}"
        self.seen.add((method, template, str(resp.status_code)))
        if resp.status_code == 204:
            assert not resp.content and "content" not in answer, label
            return resp
        media = resp.headers["content-type"]
        assert media in answer["content"] or media.split(";")[0] in answer["content"], label
        if media.startswith("application/json"):
            schema = answer["content"]["application/json"]["schema"]
            errors = [e.message for e in _validator(self.doc, schema).iter_errors(resp.json())]
            assert not errors, f"{label}: {errors}"
        for name, header in answer.get("headers", {}).items():
            sent = resp.headers.get(name)
            if sent is None:
                assert not header.get("required"), f"{label}: no {name} header"
                continue
            if header["schema"]["type"] == "integer":
                int(sent)
        return resp


@pytest.fixture
def stored_user(make_settings: Callable[..., Settings], sqlite_url: str) -> str:
    return factories.stored_user(Runtime(make_settings(DATABASE_URL=sqlite_url)))


@pytest.fixture
def app_settings(
    make_settings: Callable[..., Settings], sqlite_url: str, own_redis: RedisServer
) -> Settings:
    """On a Redis of the test's own, which it kills."""
    return make_settings(
        DATABASE_URL=sqlite_url, REDIS_URL=own_redis.url, HUMANCONNECT_API_TOKEN=API_TOKEN
    )


def _finish(answers: Answers, settings: Settings) -> None:
    """Every answer of POST /connect/finish and GET /connect/finish/{id} but the 503s."""
    json_type = {"Content-Type": "application/json"}
    body = factories.finish_body()
    accepted = answers.post(json=body).json()
    assert answers.post(json=body).json()["requestId"] == accepted["requestId"]
    answers.post(json={**body, "humanId": factories.human_id()})  # 409
    answers.post(content=b"{", headers=json_type)  # 400
    answers.post(json={"humanId": "x"})  # 400
    answers.post(content=json.dumps(body), headers={"Content-Type": "text/plain"})  # 415
    answers.post(content=b" " * (MAX_BODY_BYTES + 1), headers=json_type)  # 413
    answers.post(json={**factories.finish_body(), "clientId": "another-app"})  # 422
    template = "/connect/finish/{request_id}"
    answers.get(template, accepted["statusUrl"])
    answers.get(template, "/connect/finish/unknown")  # 404

    # With `Prefer: wait`, a session whose exchange ended: 201 or 422 with its status_records.
    r = redis.Redis.from_url(settings.redis_url or "")
    cipher = Runtime(settings).cipher
    ends = {
        RequestState.SUCCEEDED: {"clientUserId": "u@example.com", "publicToken": cipher.seal("p")},
        RequestState.FAILED: {"error": "permanent: upstream said 401"},
    }
    for state, fields in ends.items():
        body = factories.finish_body()
        request_id = answers.post(json=body).json()["requestId"]
        status_records.set_state(r, request_id, state, settings.status_ttl_s, **fields)
        resp = answers.post(json=body, headers={"Prefer": "wait=1"})
        assert resp.json()["status"] == state
        answers.get(template, f"/connect/finish/{request_id}")
    r.close()


def _users_and_ops(answers: Answers, client_user_id: str) -> None:
    template = "/users/{client_user_id}"
    answers.get(template, f"/users/{client_user_id}", headers=BEARER)
    answers.get(template, f"/users/{client_user_id}")  # 401
    answers.get(template, "/users/nobody", headers=BEARER)  # 404
    answers.delete(template, f"/users/{client_user_id}")  # 401
    answers.delete(template, "/users/%01", headers=BEARER)  # 422: a control character
    answers.delete(template, f"/users/{client_user_id}", headers=BEARER)  # 204
    answers.delete(template, f"/users/{client_user_id}", headers=BEARER)  # 404: erased
    answers.get("/healthz", "/healthz")
    answers.get("/readyz", "/readyz")
    answers.get("/metrics", "/metrics")
    answers.get("/humanconnect.js", "/humanconnect.js")


def _current_flow(answers: Answers, standin: Running, stored_user: str, db_url: str) -> None:
    """The current flow's answers, with a worker minting (the caller runs one)."""
    ticket = factories.ticket("new@example.com")
    json_type = {"Content-Type": "application/json"}
    nothing = {"sessionResults": {"connectedSources": []}, "currentConnections": []}
    answers.post(json=nothing, headers=ticket)  # 200: nothing connected
    token = "/connect/token"
    answers.post(token, token, headers=ticket)  # 200: a session token minted
    answers.post(token, token)  # 401: no ticket
    answers.post(token, token, content=b" " * (MAX_BODY_BYTES + 1), headers=json_type)  # 413
    standin.state.faults = Faults(refuse_status=401)
    other = factories.ticket("refused@example.com")
    answers.post(token, token, headers=other)  # 502: the provider refused
    answers.post(token, token, headers=other)  # 429: that user's one mint a minute started
    standin.state.faults = Faults()
    access = "/users/{client_user_id}/access-token"
    answers.get(access, f"/users/{stored_user}/access-token", headers=BEARER)  # 200: no expiry
    answers.get(access, f"/users/{stored_user}/access-token")  # 401
    answers.get(access, "/users/nobody/access-token", headers=BEARER)  # 404
    with session_factory(db_url)() as db:  # expired; the provider knows no source of theirs
        db.execute(text("UPDATE users SET access_expires_us = 1"))
        db.commit()
    answers.get(access, f"/users/{stored_user}/access-token", headers=BEARER)  # 409


def test_every_documented_answer_is_given_as_documented(
    app_settings: Settings,
    stored_user: str,
    own_redis: RedisServer,
    standin: Running,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """Each route, driven to each of its answers (Redis and the database up, the database
    unreachable, Redis down): every answer is documented with its body, headers and content
    type, and every documented answer occurs."""
    seen: set[tuple[str, str, str]] = set()
    with TestClient(create_app(app_settings)) as c:
        answers = Answers(c, seen)
        _finish(answers, app_settings)
        _users_and_ops(answers, stored_user)

    no_database = app_settings.model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'missing' / 'hc.db'}"}
    )
    with TestClient(create_app(no_database)) as c:
        answers = Answers(c, seen)
        answers.get("/connect/finish/{request_id}", "/connect/finish/unknown")  # 503
        answers.get("/users/{client_user_id}", f"/users/{stored_user}", headers=BEARER)  # 503
        answers.delete("/users/{client_user_id}", "/users/someone", headers=BEARER)  # 503
        answers.get("/readyz", "/readyz")  # 503
        access = "/users/{client_user_id}/access-token"
        answers.get(access, f"/users/{stored_user}/access-token", headers=BEARER)  # 503

    ticketed = app_settings.model_copy(
        update={"ticket_key": SecretStr(TICKET_KEY), "finish_limit_per_user_text": "1/minute"}
    )
    env = deployment_env(own_redis.url, sqlite_url, standin.url)
    worker = start_worker(env, ROOT, tmp_path / "worker.log", concurrency=4)
    try:
        with TestClient(create_app(ticketed)) as c:
            answers = Answers(c, seen)
            answers.post(json=factories.finish_body())  # 401: no ticket
            # The user `_users_and_ops` erased, stored again.
            again = factories.stored_user(Runtime(ticketed))
            _current_flow(answers, standin, again, sqlite_url)
    finally:
        worker.stop()

    limited = app_settings.model_copy(update={"finish_limit_per_ip_text": "1/minute"})
    with TestClient(create_app(limited)) as c:
        answers = Answers(c, seen)
        answers.post(json=factories.finish_body())  # 202
        answers.post(json=factories.finish_body())  # 429: over the address's limit

    with TestClient(create_app(app_settings)) as c:
        answers = Answers(c, seen)
        answers.post("/connect/token", "/connect/token")  # 404: tickets are off
        own_redis.kill()
        answers.post(json=factories.finish_body())  # 503
        answers.get("/readyz", "/readyz")  # 503 (again)
    with TestClient(create_app(ticketed)) as c:  # Redis still down
        answers = Answers(c, seen)
        ticket = factories.ticket("late@example.com")
        answers.post("/connect/token", "/connect/token", headers=ticket)  # 503

    documented = {
        (method, path, code)
        for path, operations in answers.doc["paths"].items()
        for method, operation in operations.items()
        for code in operation["responses"]
    }
    assert seen == documented
