"""Tables of the serving gateway (API keys, logged responses, production feedback), on the store's `Base`.

All serving tables live here so one Alembic revision (0006) creates them. A logged response's primary key is
the OpenAI `id` the client received (`chatcmpl-...`, `cmpl-...`), so `POST /v1/feedback` names it directly.
Feedback rows cascade with their response: the retention purge deletes a response and its feedback together.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from alignflow.store.models import Base, utcnow

FEEDBACK_KINDS = ("thumbs_up", "thumbs_down", "rating", "correction", "regenerate", "abandon", "text")


class ServingApiKey(Base):
    """A gateway API key; only its SHA-256 is stored. `rate_per_minute` None = the config's default limit."""

    __tablename__ = "serving_api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    rate_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ServingResponse(Base):
    """One logged completion: what was asked, what was answered, by which model version and arm."""

    __tablename__ = "serving_responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the OpenAI `id` the client got
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    model: Mapped[str] = mapped_column(String(128))  # the deploy.yaml model name
    version: Mapped[str] = mapped_column(String(255))  # checkpoint id or name@version
    arm: Mapped[str | None] = mapped_column(String(64), nullable=True)
    experiment: Mapped[str | None] = mapped_column(String(128), nullable=True)
    user: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # sha256 of `prompt`: finds the other arm's answer to the same prompt without comparing long texts.
    prompt_sha256: Mapped[str] = mapped_column(String(64), index=True)
    prompt: Mapped[str] = mapped_column(Text)  # the rendered prompt (chat: the messages' text)
    messages: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    response: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    key_id: Mapped[int | None] = mapped_column(
        ForeignKey("serving_api_keys.id", ondelete="SET NULL"), nullable=True
    )
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ServingFeedback(Base):
    """A feedback event on a logged response; `processed_at` set once `feedback_to_annotation` used it."""

    __tablename__ = "serving_feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(
        ForeignKey("serving_responses.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))  # one of FEEDBACK_KINDS
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..5, kind "rating"
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)  # kind "correction"
    text: Mapped[str | None] = mapped_column(Text, nullable=True)  # free text (any kind)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    key_id: Mapped[int | None] = mapped_column(
        ForeignKey("serving_api_keys.id", ondelete="SET NULL"), nullable=True
    )
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The annotation items and production_feedback artifact this feedback became (lineage, idempotency).
    item_ids: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    artifact_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


# feedback_to_annotation scans unprocessed feedback in time order.
Index("ix_serving_feedback_pending", ServingFeedback.processed_at, ServingFeedback.created_at)
