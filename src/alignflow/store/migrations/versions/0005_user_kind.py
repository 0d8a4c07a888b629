"""user kind: "human" or "ai" (an AI judge's account) and the judge spec an ai account runs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every account before this revision was a person, hence the server default.
    with op.batch_alter_table("fb_users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=8), server_default="human", nullable=False))
        batch_op.add_column(sa.Column("judge_spec", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fb_users", schema=None) as batch_op:
        batch_op.drop_column("judge_spec")
        batch_op.drop_column("kind")
