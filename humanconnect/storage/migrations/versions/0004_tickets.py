"""sessions: error_kind wide enough for client_user_mismatch; the ticket's clientUserId

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.alter_column(
            "error_kind", existing_type=sa.String(16), type_=sa.String(32), existing_nullable=True
        )
        batch.add_column(sa.Column("expected_client_user_id", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("expected_client_user_id")
        batch.alter_column(
            "error_kind", existing_type=sa.String(32), type_=sa.String(16), existing_nullable=True
        )
