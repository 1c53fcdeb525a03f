"""The ASGI entry point the Procfile's `web` runs: `uvicorn producer.main:app`."""

from producer.app import create_app
from worker.errors import ConfigError
from worker.settings import exit_on_config_error, settings_or_exit

settings = settings_or_exit()
try:
    settings.require(secret=False)
except ConfigError as exc:
    exit_on_config_error(str(exc))

app = create_app(settings)
