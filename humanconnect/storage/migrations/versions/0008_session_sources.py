"""sessions.connected_sources: an access finish's connected sources, for `failed --retry`

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Null: a session of the original flow, or an access finish from before this column.
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("connected_sources", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("connected_sources")
