"""The `humanconnect` command line."""

from __future__ import annotations

import argparse
import sys

from worker.errors import ConfigError
from worker.settings import SANDBOX_CLIENT_ID, Settings, load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="humanconnect", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run the whole service on this machine")
    p_up.add_argument("--port", type=int, default=None, help="web port (default $PORT or 8000)")
    p_demo = sub.add_parser("demo", help="fire simulated onboardings at a running sandbox")
    p_demo.add_argument("--users", type=int, default=100)
    p_demo.add_argument("--url", default="http://127.0.0.1:8000")
    p_demo.add_argument("--concurrency", type=int, default=50)
    p_db = sub.add_parser("db", help="database schema")
    p_db.add_argument("action", choices=["upgrade"])
    p_keys = sub.add_parser("keys", help="encryption keys")
    p_keys.add_argument("action", choices=["rotate"])
    args = parser.parse_args(argv)

    try:
        settings = load()
        sys.exit(_dispatch(args, settings))
    except ConfigError as exc:
        sys.stderr.write(f"humanconnect: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "up":
        from humanconnect.up import up

        return up(settings, port=args.port)
    if args.command == "demo":
        from humanconnect.demo import demo

        if args.users < 1:
            raise ConfigError("--users must be at least 1")
        client_id = settings.client_id or SANDBOX_CLIENT_ID
        return demo(args.url, args.users, client_id, concurrency=args.concurrency)
    if args.command == "db":
        from worker import migrate

        migrate.upgrade(settings.database_url)
        sys.stdout.write(f"database at head: {_safe_url(settings.database_url)}\n")
        return 0
    if args.command == "keys":
        from worker.keys import rotate_all
        from worker.runtime import Runtime

        rotated = rotate_all(Runtime(settings))
        sys.stdout.write(f"re-encrypted {rotated} users under the first key\n")
        return 0
    raise AssertionError(args.command)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
