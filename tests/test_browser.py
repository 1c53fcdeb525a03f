"""In a real browser (headless Chromium from Debian's package, driven by Playwright): the
sandbox page end to end, the browser client from a listed origin, an unlisted origin refused by
the browser itself, and the forgery refused. Screenshots of each sandbox stage go to
var/screenshots/."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from humanconnect import redis_keys
from humanconnect.crypto import session_hash
from humanconnect.sandbox.connect import human_id_for
from humanconnect.sandbox.standin import Faults, Running
from humanconnect.tickets import mint
from tests.support.env import CI, CLIENT_ID, ROOT, TICKET_KEY
from tests.support.processes import Deployment
from tests.support.scan import stored_users
from tests.support.servers import StaticSite

pytest.importorskip("playwright")
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright  # noqa: E402

# A real browser and a real deployment per test: the full suite only.
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "var" / "screenshots"
# Without the background-networking flags Chromium keeps dialling hosts this machine can't reach.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium: skipped where none is installed, required in CI."""
    if not Path(CHROMIUM).exists():
        if CI:
            raise RuntimeError(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 900, "height": 640})
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def _connect_on_sandbox_page(page: Page, button: str, shots: str | None = None) -> str:
    """Click `button`, connect a source in the stand-in's popup; the result line's class."""
    with page.expect_popup() as opened:
        page.click(button)
    popup = opened.value
    popup.wait_for_selector("#connect-source")
    if shots:
        _shot(popup, f"{shots}-2-connect-popup")
    popup.click("#connect-source")
    page.wait_for_selector("#result.ok, #result.bad")
    return page.get_attribute("#result", "class") or ""


def test_sandbox_page_connects_and_shows_the_public_token(
    deploy: Callable[..., Deployment], standin: Running, context: BrowserContext
) -> None:
    """A user clicks Connect, connects a source in the popup, and sees their request go from
    queued to succeeded with the publicToken the upstream issued, now stored for them."""
    standin.state.faults = Faults(latency_ms=400)
    d = deploy(sandbox_web=True)
    page = context.new_page()
    page.goto(d.url + "/?user=alice%40example.com")
    assert page.inner_text("#me") == "alice@example.com"
    _shot(page, "sandbox-1-app")
    assert _connect_on_sandbox_page(page, "#connect", shots="sandbox") == "ok"
    _shot(page, "sandbox-3-succeeded")
    steps = [s.strip() for s in page.locator("#trail li").all_inner_texts()]
    states = [s for s in steps if s in ("queued", "running", "retrying", "succeeded")]
    assert states[0] == "queued" and states[-1] == "succeeded", steps
    human = human_id_for("alice@example.com")
    shown = page.get_attribute("#result", "data-public-token")
    assert shown == standin.state.by_human[human].public_token
    stored = stored_users(d.db_url)[human]
    assert (stored.client_user_id, stored.public_token) == ("alice@example.com", shown)


def test_sandbox_forgery_is_refused_and_the_victim_keeps_their_tokens(
    deploy: Callable[..., Deployment], standin: Running, context: BrowserContext
) -> None:
    """The victim connects; Mallory, logged in as herself, opens Connect as the victim: the page
    shows the refusal and the victim's stored tokens are the ones they got."""
    d = deploy(sandbox_web=True)
    page = context.new_page()
    page.goto(d.url + "/?user=victim%40example.com")
    assert _connect_on_sandbox_page(page, "#connect") == "ok"
    victim = stored_users(d.db_url)[human_id_for("victim@example.com")]
    page.goto(d.url + "/?user=mallory%40example.com&victim=victim%40example.com")
    assert _connect_on_sandbox_page(page, "#forge") == "bad"
    _shot(page, "sandbox-4-forgery-refused")
    assert "another user" in page.inner_text("#result")
    after = stored_users(d.db_url)[human_id_for("victim@example.com")]
    assert (after.access_token, after.public_token) == (victim.access_token, victim.public_token)
    assert len(stored_users(d.db_url)) == 1


def test_sandbox_page_runs_the_current_flow(
    deploy: Callable[..., Deployment], standin: Running, context: BrowserContext
) -> None:
    """The provider's current flow: the page has the service mint a session token, Connect
    opens with it and closes with one source connected, and the service fetches and stores
    the user's access token."""
    d = deploy(sandbox_web=True)
    page = context.new_page()
    page.goto(d.url + "/?user=nora%40example.com")
    with page.expect_popup() as opened:
        page.click("#connect-current")
    popup = opened.value
    popup.wait_for_selector("#connect-source")
    _shot(popup, "current-1-connect-popup")
    popup.click("#connect-source")
    page.wait_for_selector("#result.ok, #result.bad")
    _shot(page, "current-2-succeeded")
    steps = [s.strip() for s in page.locator("#trail li").all_inner_texts()]
    assert page.get_attribute("#result", "class") == "ok", (steps, page.inner_text("#result"))
    assert steps[:2] == ["token minted: session", "connect closed: 1 source(s) connected"]
    assert steps[-1] == "succeeded", steps
    auth = standin.state.auth
    assert auth.mints == {"session:nora@example.com": 1, "access:nora@example.com": 1}
    stored = stored_users(d.db_url)[human_id_for("nora@example.com")]
    assert stored.client_user_id == "nora@example.com"
    assert stored.access_token == auth.newest_access["nora@example.com"]
    assert stored.access_expires_us is not None


APP_PAGE = """<!doctype html><html><body><p id="ready">app on another origin</p>
<script type="module">
import finishConnect from "{web}/humanconnect.js";
window.finish = (sto, ticket) => finishConnect(sto, {{ticket, baseUrl: "{web}", wait: 10}});
window.ready = true;
</script></body></html>"""

RAW_FETCH = """async ([url, body]) => {
  try {
    const r = await fetch(url + "/connect/finish", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    return "answered " + r.status;
  } catch (e) { return "rejected " + e.name; }
}"""


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[StaticSite]:
    """A static site on another loopback port: another origin than the service's."""
    site = StaticSite(tmp_path)
    yield site
    site.stop()


def _popup_session(standin: Running, user: str) -> dict[str, str]:
    import httpx

    resp = httpx.post(
        standin.url + "/connect/sessions", json={"clientId": CLIENT_ID, "clientUserId": user}
    )
    return dict(resp.json())


def test_a_listed_origin_finishes_through_the_browser_client(
    deploy: Callable[..., Deployment],
    standin: Running,
    context: BrowserContext,
    other_origin: StaticSite,
) -> None:
    """A page on an origin in HUMANCONNECT_CORS_ORIGINS imports /humanconnect.js from the
    service and finishes a session with its ticket: it resolves with the succeeded status."""
    d = deploy(HUMANCONNECT_TICKET_KEY=TICKET_KEY, HUMANCONNECT_CORS_ORIGINS=other_origin.origin)
    (other_origin.folder / "app.html").write_text(APP_PAGE.format(web=d.url))
    page = context.new_page()
    page.goto(other_origin.origin + "/app.html")
    page.wait_for_function("window.ready === true")
    body = _popup_session(standin, "carol@example.com")
    status: dict[str, Any] = page.evaluate(
        "([sto, ticket]) => window.finish(sto, ticket)",
        [body, mint(TICKET_KEY, "carol@example.com")],
    )
    assert status["status"] == "succeeded", json.dumps(status)
    assert status["clientUserId"] == "carol@example.com"
    assert status["publicToken"] == standin.state.by_session[body["sessionToken"]].public_token


def test_an_unlisted_origin_is_refused_by_the_browser_and_nothing_is_queued(
    deploy: Callable[..., Deployment],
    standin: Running,
    context: BrowserContext,
    other_origin: StaticSite,
    redis_client: redis.Redis,
) -> None:
    """From an origin not listed, the browser's preflight gets no CORS headers: fetch rejects,
    the POST is never sent, and nothing is queued or exchanged."""
    d = deploy(HUMANCONNECT_CORS_ORIGINS="https://app.example.com")
    (other_origin.folder / "app.html").write_text("<!doctype html><p>unlisted</p>")
    page = context.new_page()
    page.goto(other_origin.origin + "/app.html")
    body = _popup_session(standin, "dave@example.com")
    assert page.evaluate(RAW_FETCH, [d.url, body]) == "rejected TypeError"
    assert redis_client.llen(redis_keys.QUEUE) == 0
    assert not redis_client.exists(redis_keys.session_claim(session_hash(body["sessionToken"])))
    assert sum(standin.state.exchanges.values()) == 0
