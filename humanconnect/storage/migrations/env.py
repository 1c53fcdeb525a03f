"""Alembic environment: the URL comes from the caller (storage.migrate), never from a file."""

from alembic import context

from humanconnect.storage.db import engine_for
from humanconnect.storage.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    raise RuntimeError("humanconnect.storage.migrate passes the database URL")

connectable = engine_for(url)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
