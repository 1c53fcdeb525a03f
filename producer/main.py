"""The ASGI entry point the Procfile's `web` runs: `uvicorn producer.main:app --factory`.

A factory, so that importing this module reads nothing: the settings are read (and a bad
variable stops the process with one line) when uvicorn calls `app()` at start.
"""

from fastapi import FastAPI

from humanconnect import redis_policy
from humanconnect.errors import ConfigError
from humanconnect.settings import exit_on_config_error, settings_or_exit
from producer.app import create_app
from producer.warm import freeze_heap


def app() -> FastAPI:
    """The web app for the environment's settings, or exit naming the bad variable."""
    settings = settings_or_exit()
    try:
        settings.require(secret=False)
        redis_policy.check(settings.required_redis_url, allow=settings.allow_evicting_redis)
    except ConfigError as exc:
        exit_on_config_error(str(exc))
    api = create_app(settings)
    # Once per server process (tests build many apps in one process, and freeze nothing).
    freeze_heap()
    return api
