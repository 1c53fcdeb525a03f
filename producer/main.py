"""The ASGI entry point the Procfile's `web` runs: `uvicorn producer.main:app`."""

import sys

from producer.app import create_app
from worker.errors import ConfigError
from worker.settings import get_settings

try:
    get_settings().require(secret=False)
except ConfigError as exc:
    # One clear line naming the variable, no traceback, no secret.
    sys.stderr.write(f"humanconnect: {exc}\n")
    raise SystemExit(2) from None

app = create_app(get_settings())
