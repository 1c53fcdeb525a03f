"""publicToken repair bookkeeping on users

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("repair_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("repair_after_us", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("repair_error", sa.Text(), nullable=True))
    # The repair's keyset query walks only users missing a publicToken, in id order: a
    # partial index as small as the backlog, never a scan of all users.
    op.create_index(
        "ix_users_missing_public_token",
        "users",
        ["id"],
        postgresql_where=sa.text("public_token IS NULL"),
        sqlite_where=sa.text("public_token IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_users_missing_public_token", table_name="users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("repair_error")
        batch.drop_column("repair_after_us")
        batch.drop_column("repair_attempts")
