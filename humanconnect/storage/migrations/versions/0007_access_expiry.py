"""users.access_expires_us: when an access token of the provider's current flow expires

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Null: a token of the original flow, which has no expiry the service knows of.
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("access_expires_us", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("access_expires_us")
