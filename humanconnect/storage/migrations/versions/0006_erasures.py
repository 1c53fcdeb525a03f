"""erasures: the marks an erased user leaves for the sessions still in flight

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("mark", sa.String(32), nullable=False),
        sa.Column("erased_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("mark", name="pk_erasures"),
    )


def downgrade() -> None:
    op.drop_table("erasures")
