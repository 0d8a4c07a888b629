"""item meta: a JSON field for what an import knows about an item (reward-model uncertainty and its method)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:05:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fb_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("meta", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fb_items", schema=None) as batch_op:
        batch_op.drop_column("meta")
