"""serving: gateway API keys, logged responses and production feedback

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "serving_api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("rate_per_minute", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    with op.batch_alter_table("serving_api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_serving_api_keys_name"), ["name"], unique=False)

    op.create_table(
        "serving_responses",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=255), nullable=False),
        sa.Column("arm", sa.String(length=64), nullable=True),
        sa.Column("experiment", sa.String(length=128), nullable=True),
        sa.Column("user", sa.String(length=255), nullable=True),
        sa.Column("prompt_sha256", sa.String(length=64), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=True),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["serving_api_keys.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("serving_responses", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_serving_responses_created_at"), ["created_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_serving_responses_prompt_sha256"), ["prompt_sha256"], unique=False
        )

    op.create_table(
        "serving_feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("response_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("item_ids", sa.JSON(), nullable=True),
        sa.Column("artifact_id", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["serving_api_keys.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["response_id"], ["serving_responses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("serving_feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_serving_feedback_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_serving_feedback_response_id"), ["response_id"], unique=False)
        batch_op.create_index("ix_serving_feedback_pending", ["processed_at", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_table("serving_feedback")
    op.drop_table("serving_responses")
    op.drop_table("serving_api_keys")
