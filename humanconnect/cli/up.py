"""`humanconnect up`: the whole service on one machine, for trying it and for development."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

from cryptography.fernet import Fernet

from humanconnect.cli.procs import Process, commands, free_port, http_ok, stop_all, wait_ready
from humanconnect.cli.redis_server import RedisServer
from humanconnect.settings import SANDBOX_CLIENT_ID, Settings
from humanconnect.storage import migrate
from humanconnect.webhooks.signing import new_secret

VAR = Path("var")
#: The example receiver `--webhook-echo` runs (part of a source checkout, as `up` is).
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_HUMAN_ID = "52867cbede3155565f000a0d"
EXAMPLE_SESSION_TOKEN = "8836c122c0483eb193ac2dd121136931"


def _dev_key(var: Path) -> str:
    """A Fernet key kept under var/ so a second `up` can read what the first stored."""
    path = var / "dev-encryption.key"
    if path.exists():
        return path.read_text().strip()
    key = Fernet.generate_key().decode()
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _webhook_echo(settings: Settings, *envs: dict[str, str]) -> Process:
    """examples/webhook_receiver.py on a free port, added to every process's webhook URLs
    (with a fresh secret unless one is set), printing each event it verifies."""
    receiver = EXAMPLES / "webhook_receiver.py"
    echo_port = free_port()
    url = f"http://127.0.0.1:{echo_port}/hooks"
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else new_secret()
    for env in envs:
        env["HUMANCONNECT_WEBHOOK_URLS"] = ",".join([*settings.webhook_urls, url])
        env["HUMANCONNECT_WEBHOOK_SECRET"] = secret
    _say(f"webhook echo: every event is delivered, signed, to {url} and printed as 'webhook |'")
    return Process(
        "webhook",
        [sys.executable, str(receiver), "--port", str(echo_port)],
        dict(envs[0]),
        out=sys.stdout,
    )


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def up(settings: Settings, *, port: int | None = None, webhook_echo: bool = False) -> int:
    """Start Redis (unless REDIS_URL), migrations, web, worker, beat (and the sandbox)."""
    VAR.mkdir(exist_ok=True)
    port = port or int(os.environ.get("PORT", "8000"))
    base_env = {k: v for k, v in os.environ.items() if k != "HUMANAPI_CLIENT_SECRET"}
    base_env["PYTHONUNBUFFERED"] = "1"
    children: list[Process] = []
    redis_server: RedisServer | None = None
    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not settings.redis_configured:
            redis_server = RedisServer(VAR / "redis", aof=True).start()
            base_env["REDIS_URL"] = redis_server.url
            _say(f"embedded Redis on {redis_server.url} (data in {VAR / 'redis'}, AOF on)")
        if settings.encryption_keys is None:
            if not settings.sandbox:
                _say("humanconnect: HUMANCONNECT_ENCRYPTION_KEYS is required outside sandbox mode")
                return 2
            base_env["HUMANCONNECT_ENCRYPTION_KEYS"] = _dev_key(VAR)
        base_env.setdefault("DATABASE_URL", settings.database_url)
        worker_env = dict(base_env)
        if settings.sandbox:
            sandbox_secret = secrets.token_hex(20)
            standin_port = free_port()
            client_id = settings.client_id or SANDBOX_CLIENT_ID
            base_env["HUMANAPI_CLIENT_ID"] = client_id
            base_env["HUMANAPI_BASE_URL"] = f"http://127.0.0.1:{standin_port}"
            # The stand-in serves the current Connect flow's auth host too.
            base_env["HUMANAPI_AUTH_URL"] = base_env["HUMANAPI_BASE_URL"]
            worker_env = {**base_env, "HUMANAPI_CLIENT_SECRET": sandbox_secret}
            children.append(
                Process(
                    "sandbox",
                    [
                        sys.executable,
                        "-m",
                        "humanconnect.sandbox.standin",
                        "--port",
                        str(standin_port),
                        "--client-id",
                        client_id,
                        "--client-secret",
                        sandbox_secret,
                        "--latency-ms",
                        "150",
                        "--p503",
                        "0.05",
                        "--p429",
                        "0.03",
                    ],
                    base_env,
                    out=sys.stdout,
                )
            )
            _say(
                "SANDBOX MODE: no HUMANAPI_CLIENT_SECRET, exchanging against a local stand-in "
                f"of the Human API on {base_env['HUMANAPI_BASE_URL']} (not the real upstream)"
            )
            if "HUMANCONNECT_FINISH_LIMIT_PER_IP" not in base_env:
                # `demo` fires every simulated user from this one machine.
                base_env["HUMANCONNECT_FINISH_LIMIT_PER_IP"] = "off"
                _say("sandbox: no per-address finish limit (set HUMANCONNECT_FINISH_LIMIT_PER_IP)")
        elif settings.client_secret is not None:
            worker_env = {
                **base_env,
                "HUMANAPI_CLIENT_SECRET": settings.client_secret.get_secret_value(),
            }
        if webhook_echo:
            if not settings.sandbox:
                _say("humanconnect: --webhook-echo is for sandbox mode (no HUMANAPI_CLIENT_SECRET)")
                return 2
            echo = _webhook_echo(settings, base_env, worker_env)
            children.append(echo)
        migrate.upgrade(base_env["DATABASE_URL"])
        _say(f"database {base_env['DATABASE_URL']} migrated")
        cmds = commands(port, VAR)
        # The web process never sees the clientSecret; only the worker does.
        migrated = {"HUMANCONNECT_AUTO_MIGRATE": "0"}
        children.append(Process("web", cmds["web"], {**base_env, **migrated}, out=sys.stdout))
        children.append(
            Process("worker", cmds["worker"], {**worker_env, **migrated}, out=sys.stdout)
        )
        children.append(Process("beat", cmds["beat"], base_env, out=sys.stdout))
        url = f"http://127.0.0.1:{port}"
        ready = http_ok(url + "/readyz")
        if not wait_ready(ready, children, 60, stopping=lambda: stop_requested, interval=0.2):
            if stop_requested:
                return 0  # Ctrl-C while starting: a stop, not a failure
            _say("humanconnect: the service did not come up; see the lines above")
            return 1
        client_id = base_env.get("HUMANAPI_CLIENT_ID", settings.client_id or SANDBOX_CLIENT_ID)
        _say(f"\nhumanconnect is up on {url}  (Ctrl-C stops everything)\n")
        _say("Finish a session:")
        _say(f"  curl -si {url}/connect/finish -H 'Content-Type: application/json' \\")
        _say(
            f'    -d \'{{"humanId": "{EXAMPLE_HUMAN_ID}", "clientId": "{client_id}", '
            f'"sessionToken": "{EXAMPLE_SESSION_TOKEN}"}}\''
        )
        _say(f"then follow its Location: curl -s {url}/connect/finish/<requestId>\n")
        if settings.sandbox:
            _say(f"Or open the sandbox app in a browser: {url}/  (Connect, finish, forge)\n")
        while not stop_requested:
            dead = [c for c in children if not c.alive()]
            if dead:
                _say(f"humanconnect: {dead[0].name} exited with {dead[0].returncode}; stopping")
                return 1
            time.sleep(0.2)
        return 0
    finally:
        _say("stopping ...")
        stop_all(children)
        if redis_server is not None:
            redis_server.stop()
        _say("stopped")
