"""login limits: attempt status (pending / failed / ok) and indexes for the per-address and clean-up queries

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 08:45:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows written before this revision were all failures, hence the server default.
    with op.batch_alter_table("fb_login_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status", sa.String(length=8), server_default="failed", nullable=False))
        batch_op.create_index("ix_fb_login_attempts_client_at", ["client", "at"], unique=False)
        batch_op.create_index(batch_op.f("ix_fb_login_attempts_at"), ["at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("fb_login_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fb_login_attempts_at"))
        batch_op.drop_index("ix_fb_login_attempts_client_at")
        batch_op.drop_column("status")
