"""Tables of the annotation platform, declared on the store's `Base` so one Alembic history migrates them.

Counters on `fb_items` (`slots_taken`) are updated with atomic conditional UPDATEs so that, on SQLite and
PostgreSQL alike, no item is ever leased beyond its overlap. `fb_journal` is append-only: the services
insert into it and never update or delete.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from alignflow.store.models import Base, utcnow

ROLES = ("admin", "lead", "reviewer", "annotator")
TIERS = ("standard", "expert")
QC_STATES = ("active", "coach", "restrict", "recertify", "suspend")
USER_KINDS = ("human", "ai")  # "ai": an AI judge's account (`services.add_ai_user`); it never logs in


class User(Base):
    __tablename__ = "fb_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    pod: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the lead's team
    tier: Mapped[str] = mapped_column(String(16), default="standard")
    qc_state: Mapped[str] = mapped_column(String(16), default="active")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    kind: Mapped[str] = mapped_column(String(8), default="human", server_default="human")
    # The judge spec an "ai" account runs (`alignflow.judges.load_judge`), with secret-looking options redacted.
    judge_spec: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebSession(Base):
    """A browser session; the cookie holds the raw token, the table only its SHA-256."""

    __tablename__ = "fb_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("fb_users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    __tablename__ = "fb_api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("fb_users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LoginAttempt(Base):
    """Login attempts, in the database so the limits hold across several server workers (see `limiter`).

    `status` is 'pending' from before the password hash until the attempt is settled, then 'failed'; the latest
    successful login of a username from an address stays as one 'ok' row (that address is then trusted for the
    account).
    """

    __tablename__ = "fb_login_attempts"
    __table_args__ = (Index("ix_fb_login_attempts_client_at", "client", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    client: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(8), default="failed", server_default="failed")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Project(Base):
    __tablename__ = "fb_projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    overlap: Mapped[int] = mapped_column(Integer, default=3)
    gold_rate: Mapped[float] = mapped_column(Float, default=0.1)
    qa_rate: Mapped[float] = mapped_column(Float, default=0.15)
    lease_seconds: Mapped[int] = mapped_column(Integer, default=900)
    guideline_version: Mapped[int] = mapped_column(Integer, default=1)  # current
    schema_version: Mapped[int] = mapped_column(Integer, default=1)  # current
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Guideline(Base):
    __tablename__ = "fb_guidelines"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("fb_projects.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    body_md: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QuestionSchema(Base):
    __tablename__ = "fb_question_schemas"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("fb_projects.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Item(Base):
    """A prompt with 2..k candidates; `candidates` = [{"id", "text", "model", "version", "sampling"}]."""

    __tablename__ = "fb_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("fb_projects.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(128))
    prompt: Mapped[str] = mapped_column(Text)
    candidates: Mapped[list[Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    tier: Mapped[str] = mapped_column(String(16), default="standard")  # "expert" once marked ambiguous
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_label: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    slots_taken: Mapped[int] = mapped_column(Integer, default=0)  # leased + submitted annotation slots
    source: Mapped[str | None] = mapped_column(String(128), nullable=True)  # artifact id or file name
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # e.g. {"uncertainty": {...}}
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("project_id", "external_id", name="uq_fb_items_project_external"),)


# The lease query's ORDER BY (priority DESC, id) walks this index and stops after a few open items; without it
# every "next task" sorted the whole project (measured 2.2 ms -> 0.24 ms per lookup on 3,000 items, SQLite).
Index("ix_fb_items_queue", Item.project_id, Item.is_gold, Item.tier, Item.priority.desc(), Item.id)


class Assignment(Base):
    """One slot of an item leased to one user; `display_order[i]` = canonical index shown at position i."""

    __tablename__ = "fb_assignments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("fb_projects.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("fb_items.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("fb_users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="annotate")  # annotate | review
    review_of: Mapped[int | None] = mapped_column(ForeignKey("fb_responses.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="leased")  # leased|submitted|expired|skipped
    display_order: Mapped[list[Any]] = mapped_column(JSON)
    guideline_version: Mapped[int] = mapped_column(Integer)  # what the annotator was shown
    schema_version: Mapped[int] = mapped_column(Integer)
    holds_slot: Mapped[bool] = mapped_column(Boolean, default=True)  # counts in the item's slots_taken
    leased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        # The database itself guarantees an annotator never gets the same item twice.
        UniqueConstraint("item_id", "user_id", "kind", name="uq_fb_assignments_item_user_kind"),
        Index("ix_fb_assignments_lease", "status", "lease_expires_at"),
    )


class Response(Base):
    """A submitted answer (annotation or review); payload in display order plus the canonical label."""

    __tablename__ = "fb_responses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assignment_id: Mapped[str] = mapped_column(String(36), unique=True)
    client_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[int] = mapped_column(ForeignKey("fb_projects.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("fb_items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("fb_users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="annotate")  # annotate | review
    review_of: Mapped[int | None] = mapped_column(Integer, nullable=True)
    review_action: Mapped[str | None] = mapped_column(String(16), nullable=True)  # accept | correct
    guideline_version: Mapped[int] = mapped_column(Integer)
    schema_version: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    label: Mapped[Any] = mapped_column(JSON)  # "A"/"B"/"tie" or a ranking of candidate ids, canonical order
    dimension_labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    shown_swapped: Mapped[bool] = mapped_column(Boolean, default=False)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    qa_status: Mapped[str] = mapped_column(String(16), default="none")  # none | pending | leased | done
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("user_id", "client_id", name="uq_fb_responses_user_client"),)


class JournalEntry(Base):
    """Append-only record of every state change: who did what to which entity, and when."""

    __tablename__ = "fb_journal"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None = the system
    action: Mapped[str] = mapped_column(String(48), index=True)
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class QcAction(Base):
    """A QC decision on an annotator (coach, restrict, recertify, suspend); reversible by a lead."""

    __tablename__ = "fb_qc_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("fb_users.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    reverted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reverted_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
