"""The per-process objects a worker or producer needs, built once from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis
from sqlalchemy.orm import sessionmaker

from humanconnect import redis_clients
from humanconnect.crypto import Cipher
from humanconnect.settings import Settings
from humanconnect.storage.db import session_factory
from humanconnect.webhooks.deliveries import Targets


@dataclass
class Runtime:
    """Lazily built clients, shared by the threads of one process."""

    settings: Settings

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_clients.client(self.settings)

    @cached_property
    def cipher(self) -> Cipher:
        return Cipher(self.settings.key_list())

    @cached_property
    def webhook_targets(self) -> Targets:
        """Where this process's events are delivered (none unless webhooks are configured)."""
        return Targets.from_settings(self.settings)

    @cached_property
    def db(self) -> sessionmaker:
        return session_factory(self.settings.database_url)
