"""The append-only journal: every state change (who, what, when) is one inserted row, never updated."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from alignflow.feedback.models import JournalEntry


def record(
    s: Session,
    actor_id: int | None,
    action: str,
    entity: str,
    entity_id: object,
    data: dict[str, Any] | None = None,
) -> None:
    """Add a journal row in the caller's transaction, so it commits or rolls back with the change itself."""
    s.add(
        JournalEntry(
            actor_id=actor_id, action=action, entity=entity, entity_id=str(entity_id), data=data or {}
        )
    )
