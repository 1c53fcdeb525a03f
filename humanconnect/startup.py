"""Stopping a process that cannot start: one line naming the bad variable, exit status 2."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from humanconnect.errors import ConfigError
from humanconnect.settings import Settings, get_settings


def exit_on_config_error(message: str, *, at_once: bool = False) -> NoReturn:
    """Stop the process with one clear line (no traceback, no value echoed). `at_once` leaves
    without unwinding, for a Celery signal handler: Celery would turn SystemExit into a
    traceback."""
    sys.stderr.write(f"humanconnect: {message}\n")
    sys.stderr.flush()
    if at_once:
        os._exit(2)
    raise SystemExit(2)


def settings_or_exit() -> Settings:
    """`get_settings()`, or exit with one line naming the bad variable."""
    try:
        return get_settings()
    except ConfigError as exc:
        exit_on_config_error(str(exc))


def ready_settings_or_exit(*, secret: bool, at_once: bool = False) -> Settings:
    """The settings with every variable a process needs (`secret`: the worker's client
    secret too) and a Redis whose eviction policy is safe, or exit naming what is wrong."""
    # Here, not at the top: the CLI imports this module for its one line and would pay for
    # the Redis and database client code on every command.
    from humanconnect import redis_clients, redis_policy

    try:
        settings = get_settings()
        settings.require(secret=secret)
        client = redis_clients.client(settings)
        try:
            redis_policy.check(client, allow=settings.allow_evicting_redis)
        finally:
            client.close()
    except ConfigError as exc:
        exit_on_config_error(str(exc), at_once=at_once)
    return settings
