"""The Human API's two endpoints, called with one pooled `requests` session per thread.

Classification follows the contract: connection errors, timeouts, 408, 425, 429 and 5xx are
transient; any other 4xx, or a success body missing what we need, is permanent.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from humanconnect.clock import now
from humanconnect.errors import PermanentUpstreamError, TransientUpstreamError

TOKENS_PATH = "/v1/connect/tokens"
PUBLICTOKENS_PATH = "/v1/connect/publictokens"
TRANSIENT_STATUSES = frozenset({408, 425, 429})
# A Retry-After beyond this is treated as this: the Celery retry takes over past it.
MAX_RETRY_AFTER_S = 3600.0

_local = threading.local()


@dataclass(frozen=True)
class Tokens:
    """What a successful exchange gives back. Never logged: see __repr__."""

    human_id: str
    client_user_id: str
    access_token: str
    public_token: str | None
    #: When the access token expires (µs since the epoch), where the provider states a
    #: lifetime (the current flow's `access` tokens); None for the original flow's.
    access_expires_us: int | None = None

    def __repr__(self) -> str:
        return f"Tokens(human_id={self.human_id!r}, client_user_id={self.client_user_id!r})"


def http_session() -> requests.Session:
    """This thread's pooled session (requests.Session is not documented as thread-safe)."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        # Our own retry policy (tenacity + Celery) decides; urllib3 must not retry behind it,
        # or one attempt could reach the upstream twice.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.headers["User-Agent"] = "humanconnect/0.1"
        # The environment is read once (see `_proxies`), not by requests on every call, which
        # costs CPU on the hot path. No .netrc either: the tokens call authenticates in its
        # body, never with a stored password.
        session.trust_env = False
        session.verify = _verify()
        _local.session = session
    return session


def _verify() -> str | bool:
    """A CA bundle from the environment, as requests reads it, else the default store.
    Never False: an empty variable must not turn verification off."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


def _template(url: str) -> requests.PreparedRequest:
    """This thread's POST to `url` as its session prepares it (its headers), made once: each
    call copies it and adds its body."""
    templates: dict[str, requests.PreparedRequest] | None = getattr(_local, "templates", None)
    if templates is None:
        templates = _local.templates = {}
    template = templates.get(url)
    if template is None:
        template = http_session().prepare_request(requests.Request("POST", url))
        # Cookies are each call's, from the jar as it is then (`_send`): the template keeps
        # none, or a cookie the upstream later changed would go on being sent.
        template.headers.pop("Cookie", None)
        templates[url] = template
    return template


def _send(url: str, body: dict[str, str], timeout: tuple[float, float]) -> requests.Response:
    """POST `body` as JSON to `url` on this thread's session, its body read.

    A copy of a request prepared once, sent with `Session.send`, not `Session.post`:
    preparing each request anew (merging the session's settings, cookie jars and hooks) cost
    about as much CPU as the HTTP exchange itself on every exchange. Cookies the upstream set
    are still kept and sent back, `Session.send` still runs the session's hooks and reads the
    body, and the tracing of `requests` still covers the whole call. A redirect is not
    followed: it is answered as the status it is (the client secret is never posted again to
    a place a response names)."""
    session = http_session()
    request = _template(url).copy()
    if session.cookies:  # the upstream set some (a balancer's affinity): sent back, as before
        request.prepare_cookies(session.cookies)
    request.prepare_body(data=None, files=None, json=body)
    return session.send(request, allow_redirects=False, timeout=timeout, proxies=_proxies(url))


@lru_cache(maxsize=8)
def _proxies(url: str) -> dict[str, str]:
    """HTTP(S)_PROXY / NO_PROXY for `url`, as requests would read them from the environment."""
    return dict(requests.utils.get_environ_proxies(url))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = (when - now()).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def post_json(
    url: str, body: dict[str, str], *, connect_timeout: float, read_timeout: float
) -> dict[str, Any]:
    """POST `body` as JSON; return the decoded JSON object or raise a classified error.

    A transient error whose request may have reached the upstream carries `ambiguous=True`.
    """
    try:
        resp = _send(url, body, (connect_timeout, read_timeout))
    except requests.exceptions.ConnectTimeout:
        raise _transient("connect timeout", ambiguous=False) from None
    except requests.exceptions.ReadTimeout:
        raise _transient("read timeout", ambiguous=True) from None
    except requests.exceptions.ConnectionError as exc:
        # Refused before sending is safe; reset or closed after sending may have landed.
        refused = "refused" in str(exc).lower() or "newconnectionerror" in repr(exc).lower()
        raise _transient("connection error", ambiguous=not refused) from None
    except requests.exceptions.RequestException:
        raise _transient("request error", ambiguous=True) from None
    status = resp.status_code
    if status in TRANSIENT_STATUSES or status >= 500:
        raise TransientUpstreamError(
            f"upstream answered {status}",
            status=status,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )
    if status >= 400:
        raise PermanentUpstreamError(f"upstream refused with {status}", status=status)
    if status not in (200, 201):
        raise PermanentUpstreamError(f"unexpected upstream status {status}", status=status)
    try:
        data = resp.json()
    except ValueError:
        raise PermanentUpstreamError("upstream success body is not JSON", status=status) from None
    if not isinstance(data, dict):
        raise PermanentUpstreamError("upstream success body is not an object", status=status)
    return data


def _transient(reason: str, *, ambiguous: bool) -> TransientUpstreamError:
    return TransientUpstreamError(reason, ambiguous=ambiguous)


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def exchange_tokens(
    base_url: str,
    *,
    human_id: str,
    client_id: str,
    client_secret: str,
    session_token: str,
    connect_timeout: float,
    read_timeout: float,
) -> Tokens:
    """Sign and exchange one session at the tokens endpoint."""
    body = {
        "humanId": human_id,
        "clientId": client_id,
        "clientSecret": client_secret,
        "sessionToken": session_token,
    }
    data = post_json(
        base_url + TOKENS_PATH, body, connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    answered_human = _text(data, "humanId")
    access = _text(data, "accessToken")
    client_user = _text(data, "clientUserId")
    missing = [
        k
        for k, v in (
            ("humanId", answered_human),
            ("accessToken", access),
            ("clientUserId", client_user),
        )
        if v is None
    ]
    if missing or not (answered_human and access and client_user):
        raise PermanentUpstreamError(f"upstream success body lacks {', '.join(missing)}")
    return Tokens(
        human_id=answered_human,
        client_user_id=client_user,
        access_token=access,
        public_token=_text(data, "publicToken"),
    )


def fetch_public_token(
    base_url: str,
    *,
    human_id: str,
    client_id: str,
    client_secret: str,
    connect_timeout: float,
    read_timeout: float,
) -> str:
    """Ask the publictokens endpoint for a user's publicToken."""
    body = {"humanId": human_id, "clientId": client_id, "clientSecret": client_secret}
    data = post_json(
        base_url + PUBLICTOKENS_PATH,
        body,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    token = _text(data, "publicToken")
    if token is None:
        raise PermanentUpstreamError("upstream publictokens body lacks publicToken")
    return token
