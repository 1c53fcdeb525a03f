"""The ASGI entry point the Procfile's `web` runs: `uvicorn producer.main:app --factory`.

A factory, so that importing this module reads nothing: the settings are read (and a bad
variable stops the process with one line) when uvicorn calls `app()` at start.
"""

from fastapi import FastAPI

from humanconnect import tracing
from humanconnect.startup import ready_settings_or_exit
from producer.app import create_app
from producer.warm import freeze_heap


def app() -> FastAPI:
    """The web app for the environment's settings, or exit naming the bad variable."""
    settings = ready_settings_or_exit(secret=False)
    tracing.install("web", settings)
    api = create_app(settings)
    tracing.instrument_web(api)
    # Once per server process (tests build many apps in one process, and freeze nothing).
    freeze_heap()
    return api
