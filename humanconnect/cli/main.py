"""The `humanconnect` command line."""

from __future__ import annotations

import argparse
import sys

from humanconnect.errors import ConfigError
from humanconnect.settings import SANDBOX_CLIENT_ID, Settings, load
from humanconnect.startup import exit_on_config_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="humanconnect", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run the whole service on this machine")
    p_up.add_argument("--port", type=int, default=None, help="web port (default $PORT or 8000)")
    p_up.add_argument(
        "--webhook-echo",
        action="store_true",
        help="sandbox: deliver every event to examples/webhook_receiver.py and print it",
    )
    p_demo = sub.add_parser("demo", help="fire simulated onboardings at a running sandbox")
    p_demo.add_argument("--users", type=int, default=100)
    p_demo.add_argument("--url", default="http://127.0.0.1:8000")
    p_demo.add_argument("--concurrency", type=int, default=50)
    p_failed = sub.add_parser("failed", help="list permanently failed exchanges")
    p_failed.add_argument(
        "--retry", action="store_true", help="re-queue those whose error was transient"
    )
    p_repair = sub.add_parser("repair", help="run the publicToken repair now")
    p_repair.add_argument("--dry-run", action="store_true", help="count and list, call nothing")
    p_repair.add_argument("--limit", type=int, default=None, help="at most N users")
    p_repair.add_argument(
        "--retry-failed",
        action="store_true",
        help="first make users whose repair failed for good (404, 401) eligible again",
    )
    p_db = sub.add_parser("db", help="database schema")
    p_db.add_argument("action", choices=["upgrade"])
    p_keys = sub.add_parser("keys", help="encryption keys")
    p_keys.add_argument("action", choices=["rotate"])
    p_ticket = sub.add_parser(
        "ticket", help="print a connect ticket for a user, signed with HUMANCONNECT_TICKET_KEY"
    )
    p_ticket.add_argument("client_user_id", metavar="CLIENT_USER_ID")
    p_ticket.add_argument(
        "--ttl", type=int, default=600, help="seconds the ticket lives (at most 3600; 600)"
    )
    p_ticket.add_argument(
        "--email", help="the user's email (the current flow sends it when it mints a session)"
    )
    p_users = sub.add_parser("users", help="users")
    users = p_users.add_subparsers(dest="action", required=True)
    p_erase = users.add_parser(
        "erase", help="erase a user everywhere: tokens, sessions, status records, events"
    )
    p_erase.add_argument("client_user_id", metavar="CLIENT_USER_ID")
    p_hooks = sub.add_parser("webhooks", help="webhook deliveries")
    hooks = p_hooks.add_subparsers(dest="action", required=True)
    hooks.add_parser("secret", help="print a new HUMANCONNECT_WEBHOOK_SECRET")
    p_list = hooks.add_parser("list", help="the newest deliveries and each endpoint's backlog")
    p_list.add_argument("--failed", action="store_true", help="failed deliveries only")
    p_list.add_argument("--limit", type=int, default=50)
    p_retry = hooks.add_parser("retry", help="make deliveries due now, with a fresh schedule")
    p_retry.add_argument("--failed", action="store_true", help="failed ones only (not pending)")
    p_retry.add_argument("--since", default=None, help="events since: 2h, 1d or an ISO time")
    p_test = hooks.add_parser("test", help="send a signed webhook.test event to URL")
    p_test.add_argument("url", metavar="URL")
    args = parser.parse_args(argv)

    try:
        settings = load()
        sys.exit(_dispatch(args, settings))
    except ConfigError as exc:
        exit_on_config_error(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "up":
        from humanconnect.cli.up import up

        return up(settings, port=args.port, webhook_echo=args.webhook_echo)
    if args.command == "demo":
        from humanconnect.cli.demo import demo

        if args.users < 1:
            raise ConfigError("--users must be at least 1")
        client_id = settings.client_id or SANDBOX_CLIENT_ID
        return demo(args.url, args.users, client_id, concurrency=args.concurrency)
    if args.command == "repair":
        from humanconnect.cli.repair import repair

        if args.limit is not None and args.limit < 1:
            raise ConfigError("--limit must be at least 1")
        return repair(
            settings, limit=args.limit, dry_run=args.dry_run, retry_failed=args.retry_failed
        )
    if args.command == "failed":
        return _failed(settings, retry=args.retry)
    if args.command == "db":
        from humanconnect.storage import migrate

        migrate.upgrade(settings.database_url)
        sys.stdout.write(f"database at head: {_safe_url(settings.database_url)}\n")
        return 0
    if args.command == "ticket":
        from humanconnect.tickets import MAX_TTL_S, mint

        if settings.ticket_key is None:
            raise ConfigError("HUMANCONNECT_TICKET_KEY is required to sign a ticket")
        if not 0 < args.ttl <= MAX_TTL_S:
            raise ConfigError(f"--ttl must be between 1 and {MAX_TTL_S}")
        key = settings.ticket_key.get_secret_value()
        sys.stdout.write(mint(key, args.client_user_id, args.ttl, email=args.email) + "\n")
        return 0
    if args.command == "webhooks":
        from humanconnect.cli import webhooks

        if args.action == "secret":
            return webhooks.secret()
        if args.action == "list":
            if args.limit < 1:
                raise ConfigError("--limit must be at least 1")
            return webhooks.listing(settings, failed_only=args.failed, limit=args.limit)
        if args.action == "retry":
            return webhooks.retry(settings, failed_only=args.failed, since=args.since)
        return webhooks.test(settings, args.url)
    if args.command == "users":
        return _erase(settings, args.client_user_id)
    if args.command == "keys":
        return _rotate(settings)
    raise AssertionError(args.command)


def _rotate(settings: Settings) -> int:
    import redis

    from humanconnect.jobs.rotation import rotate_all
    from humanconnect.runtime import Runtime

    try:
        rotated = rotate_all(Runtime(settings))
    except redis.RedisError as exc:
        # Redis is asked only after the database's part has committed.
        sys.stderr.write(
            "humanconnect: the database's tokens are re-encrypted, the Connect tokens kept in "
            f"Redis are not ({type(exc).__name__}: {exc}); run it again\n"
        )
        return 1
    sys.stdout.write(
        f"re-encrypted {rotated.users} users, {rotated.sessions} kept session tokens and "
        f"{rotated.connect_tokens} kept Connect tokens under the first key\n"
    )
    return 0


def _erase(settings: Settings, client_user_id: str) -> int:
    """0 erased, 1 unknown (or a second erase); a malformed id stops it like a bad setting."""
    from humanconnect.erasure import erase
    from humanconnect.runtime import Runtime
    from humanconnect.users import valid_client_user_id

    if not valid_client_user_id(client_user_id):
        raise ConfigError("CLIENT_USER_ID must be 1 to 255 characters, no control characters")
    erased = erase(Runtime(settings), client_user_id)
    if erased is None:
        sys.stderr.write("humanconnect: unknown user: nothing to erase\n")
        return 1
    sys.stdout.write(
        f"erased: {erased.tokens} tokens row, {erased.sessions} sessions, "
        f"{erased.events} events, {erased.redis_keys} Redis keys and stream entries\n"
    )
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _failed(settings: Settings, *, retry: bool) -> int:
    from rich.console import Console
    from rich.table import Table

    from humanconnect.jobs.failures import list_failed, requeue_transient
    from humanconnect.queue import send_exchange, sender
    from humanconnect.runtime import Runtime

    rt = Runtime(settings)
    console = Console()
    if retry:
        settings.require(secret=False)
        celery = sender(settings)
        count = requeue_transient(rt, lambda request: send_exchange(celery, request))
        console.print(f"re-queued {count} sessions whose last error was transient")
        return 0
    failures = list_failed(rt)
    table = Table(title=f"{len(failures)} failed exchanges")
    for col in ("requestId", "humanId", "kind", "retryable", "when", "error"):
        table.add_column(col)
    for f in failures:
        table.add_row(
            f.request_id,
            f.human_id,
            f.error_kind or "",
            "yes" if f.retryable else "no",
            f.updated_at.isoformat(timespec="seconds"),
            (f.error or "")[:120],
        )
    console.print(table)
    return 0
