"""Alembic environment: the URL comes from the caller (worker.migrate), never from a file."""

from alembic import context

from worker.db import engine_for
from worker.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    raise RuntimeError("worker.migrate passes the database URL")

connectable = engine_for(url)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
